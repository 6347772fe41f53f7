"""The hypergrad benchmark suite: what a hyperstep costs, in time and memory, against a plain
PyTorch training step of the same loss, against the sum of its primitives, and against the peers.

Usage::

    python benchmarks/run.py                                # CPU, small sizes, every model
    python benchmarks/run.py --models mlp --tiny --repeats 1 --out /tmp/s.json --md /tmp/s.md
    python benchmarks/run.py --device cuda --full           # a GPU: ResNet-18 at batch 128, ~100M GPT

For every model (``models.py``): a plain PyTorch train step (the unit), hypergrad's
``hopt.step``, the primitives (a gradient, the validation gradient, the training gradient with
its graph, an HVP, the mixed VJP, the fused-Adam outer step), hypersteps of ``hg.Implicit``
(Neumann 1/3/5, CG 5, Neumann 5 on the last layer only via ``hessian_subset``) and
``hg.Unrolled`` (K = 1/5), the same hypergradients with torchopt and higher (``peers.py``), each
as ratios to the train step taken in the same round, with the floor (sum of the primitives)
beside each. Then the allocator's peak of each call above what was live before it, Implicit's
peak after 1, 10 or 30 inner steps, and the bytes Unrolled holds between hypersteps.
See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop lines on stderr
import models  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import torch  # noqa: E402
from models import LR, Problem, head_only, make_problem, train_loss, val_loss  # noqa: E402
from timing import Memory, Timer, Window, median, rounds  # noqa: E402

import hypergrad as hg  # noqa: E402

# Implicit with hessian_subset = last layer gives the other layers' decays no hypergradient, by design
warnings.filterwarnings("ignore", category=hg.DisconnectedWarning)

NEUMANN_KS = (1, 3, 5)
CG_STEPS, CG_TOL, CG_DAMPING = 5, 1e-10, 1e-3
UNROLLED_KS = (1, 5)
PRIMITIVES = ("grad", "val_grad", "train_grad_graph", "hvp", "mixed_vjp", "outer_step")


@dataclasses.dataclass
class Case:
    """One timed call. ``prepare`` runs before each call, untimed unless ``prepare_is_work``;
    ``floor`` maps the round's primitive times (seconds) and the call's info to the sum of the
    primitives it must run;
    ``peer_of`` names the hypergrad case a peer computes the same hypergradient as;
    ``prepare_is_work``: ``prepare`` is work the method needs for each call that a peer does inside
    its own call (Unrolled's K real inner steps, which higher's differentiable steps also take),
    so it is timed too and the peer is compared with the call plus it as well."""

    key: str
    group: str  # "unit", "primitive", "hypergrad", "torchopt", "higher"
    run: Callable[[], Any]
    prepare: Callable[[], None] | None = None
    floor: Callable[[dict[str, float], Any], float] | None = None
    peer_of: str | None = None
    error: str | None = None
    prepare_is_work: bool = False


def _iterations(info: Any, default: int) -> int:
    its = getattr(info, "solver_iterations", None)
    return default if its is None else int(its)


def build_cases(prob: Problem, args: argparse.Namespace) -> tuple[list[Case], dict[str, Any]]:
    """Every case for one problem, in the order each round runs them, and the hypergrad objects
    (for the agreement checks)."""
    w, h = prob.weights, prob.hparams
    tb, vb = prob.train_batch, prob.val_batch
    scratch: dict[str, Any] = {}
    objs: dict[str, Any] = {}
    cases: list[Case] = [Case("train_step", "unit", prob.torch_step)]

    base = prob.implicit(hg.Neumann(steps=5, alpha=LR))
    objs["implicit/neumann-5"] = base
    cases.append(Case("hg_step", "unit", lambda: base.step(tb)))

    def graph() -> None:
        u = [torch.randn_like(t) for t in w]
        scratch["gt"] = torch.autograd.grad(train_loss(prob.model, prob.hp, tb), w, create_graph=True)
        scratch["u"] = u

    def outer_grads() -> None:
        for p in h:
            p.grad = torch.randn_like(p).mul_(1e-6)

    outer = prob.outer()
    cases += [
        Case("grad", "primitive", lambda: torch.autograd.grad(train_loss(prob.model, prob.hp, tb), w)),
        Case(
            "val_grad",
            "primitive",
            lambda: torch.autograd.grad(
                val_loss(prob.model, prob.hp, vb), w + h, allow_unused=True, materialize_grads=True
            ),
        ),
        Case(
            "train_grad_graph",
            "primitive",
            lambda: torch.autograd.grad(train_loss(prob.model, prob.hp, tb), w, create_graph=True),
        ),
        Case(
            "hvp",
            "primitive",
            lambda: torch.autograd.grad(scratch["gt"], w, scratch["u"], retain_graph=True),
            prepare=graph,
        ),
        Case(
            "mixed_vjp",
            "primitive",
            lambda: torch.autograd.grad(
                scratch["gt"], h, scratch["u"], allow_unused=True, materialize_grads=True
            ),
            prepare=graph,
        ),
        Case("outer_step", "primitive", outer.step, prepare=outer_grads),
    ]
    if args.variants:
        cases += variant_cases(prob, scratch, outer_grads)

    def implicit_floor(k: int | None) -> Callable[[dict[str, float], Any], float]:
        def floor(p: dict[str, float], info: Any) -> float:
            n = _iterations(info, CG_STEPS) if k is None else k
            return p["val_grad"] + p["train_grad_graph"] + n * p["hvp"] + p["mixed_vjp"] + p["outer_step"]

        return floor

    def unrolled_floor(k: int) -> Callable[[dict[str, float], Any], float]:
        def floor(p: dict[str, float], info: Any) -> float:
            return (
                p["val_grad"]
                + k * p["train_grad_graph"]
                + (k - 1) * p["hvp"]
                + p["mixed_vjp"]
                + p["outer_step"]
            )

        return floor

    def hyper(hopt: hg.HyperOptimizer) -> Callable[[], Any]:
        return lambda: hopt.hyper_step(train_batch=tb, val_batch=vb)

    solvers: dict[str, tuple[hg.LinearSolver, int | None]] = {
        f"neumann-{k}": (hg.Neumann(steps=k, alpha=LR), k) for k in NEUMANN_KS
    }
    solvers[f"cg-{CG_STEPS}"] = (hg.CG(maxiter=CG_STEPS, tol=CG_TOL, damping=CG_DAMPING), None)
    for name, (solver, k) in solvers.items():
        hopt = base if name == "neumann-5" else prob.implicit(solver)
        objs[f"implicit/{name}"] = hopt
        cases.append(Case(f"implicit/{name}", "hypergrad", hyper(hopt), floor=implicit_floor(k)))
    head = prob.implicit(hg.Neumann(steps=5, alpha=LR), subset=head_only)
    objs["implicit/neumann-5-head"] = head
    cases.append(Case("implicit/neumann-5-head", "hypergrad", hyper(head)))

    for k in UNROLLED_KS:
        uh = prob.unrolled(k)
        objs[f"unrolled/k-{k}"] = uh

        def steps(uh: hg.Unrolled = uh, k: int = k) -> None:
            _steps(uh, prob, k)

        cases.append(
            Case(
                f"unrolled/k-{k}",
                "hypergrad",
                lambda uh=uh: uh.hyper_step(val_batch=vb),
                prepare=steps,
                floor=unrolled_floor(k),
                prepare_is_work=True,
            )
        )

    ck = max(UNROLLED_KS)  # the checkpointed replay: K more gradients (no graph), one step's graph alive
    uc = prob.unrolled(ck, checkpoint=True)
    objs[f"unrolled/k-{ck}-ckpt"] = uc

    def ckpt_floor(p: dict[str, float], info: Any, k: int = ck) -> float:
        return unrolled_floor(k)(p, info) + k * p["grad"]

    cases.append(
        Case(
            f"unrolled/k-{ck}-ckpt",
            "hypergrad",
            lambda: uc.hyper_step(val_batch=vb),
            prepare=lambda: _steps(uc, prob, ck),
            floor=ckpt_floor,
            prepare_is_work=True,
        )
    )

    if args.peers:
        for name, (_, k) in solvers.items():
            solver, steps_ = name.split("-")
            key = f"torchopt/{name}"
            try:
                peer = peers.make(
                    "torchopt",
                    prob,
                    solver=solver,
                    steps=int(steps_),
                    alpha=LR,
                    tol=CG_TOL,
                    damping=CG_DAMPING,
                )
                objs[key] = peer
                cases.append(Case(key, "torchopt", peer, floor=implicit_floor(k), peer_of=f"implicit/{name}"))
            except Exception as e:  # noqa: BLE001 - recorded, not fatal
                cases.append(
                    Case(
                        key,
                        "torchopt",
                        lambda: None,
                        peer_of=f"implicit/{name}",
                        error=f"{type(e).__name__}: {e}",
                    )
                )
        for k in UNROLLED_KS:
            key = f"higher/k-{k}"
            try:
                hpeer = peers.make("higher", prob, steps=k)
                cases.append(Case(key, "higher", hpeer, floor=unrolled_floor(k), peer_of=f"unrolled/k-{k}"))
            except Exception as e:  # noqa: BLE001
                cases.append(
                    Case(
                        key,
                        "higher",
                        lambda: None,
                        peer_of=f"unrolled/k-{k}",
                        error=f"{type(e).__name__}: {e}",
                    )
                )
    cases = [dataclasses.replace(c, prepare=_then_clear(c.prepare, scratch)) for c in cases]
    return cases, objs


def variant_cases(prob: Problem, scratch: dict[str, Any], outer_grads: Callable[[], None]) -> list[Case]:
    """The alternatives issue 9 asks to measure, as primitives beside the ones hypergrad uses:

    * ``train_grad_graph_no_penalty`` / ``hvp_no_penalty``: the same calls on plain cross-entropy,
      so the per-weight penalty's share of the training gradient with graph and of an HVP shows;
    * ``hvp_fwd_over_rev``: one HVP as ``torch.func.jvp`` of ``torch.func.grad`` (forward over
      reverse; recomputes the gradient each time, no graph kept between HVPs), penalty written out,
      BatchNorm on batch statistics (``replace_all_batch_norm_modules_`` on a copy); not run
      under ``--autocast``;
    * ``outer_step_unfused``: ``torch.optim.Adam`` with its default implementation instead of
      ``fused=True``.
    """
    w, tb = prob.weights, prob.train_batch
    names = [n for n, _ in prob.model.named_parameters()]
    fmodel = copy.deepcopy(prob.model)
    torch.func.replace_all_batch_norm_modules_(fmodel)

    def graph_no_penalty() -> None:
        scratch["gt"] = torch.autograd.grad(models.cross_entropy(prob.model, tb), w, create_graph=True)
        scratch["u"] = [torch.randn_like(t) for t in w]

    def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
        out = models.forward(lambda x: torch.func.functional_call(fmodel, params, (x,)), tb[0])
        ce = models.logits_loss(out, tb[1])
        decay = [r.detach().exp() for r in prob.hparams]
        return ce + 0.5 * sum((d * params[n].square()).sum() for n, d in zip(names, decay, strict=True))

    def fwd_over_rev() -> Any:
        primals = {n: t.detach() for n, t in zip(names, w, strict=True)}
        tangents = dict(zip(names, scratch["u"], strict=True))
        return torch.func.jvp(torch.func.grad(loss_of), (primals,), (tangents,))[1]

    def direction() -> None:
        scratch["u"] = [torch.randn_like(t) for t in w]

    unfused = torch.optim.Adam(prob.hp.parameters(), lr=models.OUTER_LR)
    return [
        Case(
            "train_grad_graph_no_penalty",
            "variant",
            lambda: torch.autograd.grad(models.cross_entropy(prob.model, tb), w, create_graph=True),
        ),
        Case(
            "hvp_no_penalty",
            "variant",
            lambda: torch.autograd.grad(scratch["gt"], w, scratch["u"], retain_graph=True),
            prepare=graph_no_penalty,
        ),
        Case(
            "hvp_fwd_over_rev",
            "variant",
            fwd_over_rev,
            prepare=direction,
            # torch.func.jvp through an autocast convolution fails on CPU (mkldnn dtype mismatch)
            error=None if models.AUTOCAST is None else "not run under --autocast",
        ),
        Case("outer_step_unfused", "variant", unfused.step, prepare=outer_grads),
    ]


def count_flops(cases: Sequence[Case]) -> dict[str, int | None]:
    """Each case's matmul / convolution FLOPs (``torch.utils.flop_counter``), counted once
    (prepared as when timed, untimed): the ratio to the train step's is what a FLOP-bound device
    cannot beat, whatever the implementation, so the measured ``÷ step`` reads against it.
    ``None`` where the counter fails (a peer's custom op). Where ``prepare`` is work of the method
    (``Case.prepare_is_work``: Unrolled's K inner steps), its FLOPs are counted too, under
    ``"<key>:prepare"``."""
    from torch.utils.flop_counter import FlopCounterMode

    out: dict[str, int | None] = {}
    for c in cases:
        assert c.prepare is not None
        if c.prepare_is_work:
            try:
                with FlopCounterMode(display=False) as counter:
                    c.prepare()
                out[f"{c.key}:prepare"] = int(counter.get_total_flops())
            except Exception:  # noqa: BLE001 - as below
                out[f"{c.key}:prepare"] = None
        else:
            c.prepare()
        try:
            with FlopCounterMode(display=False) as counter:
                c.run()
            out[c.key] = int(counter.get_total_flops())
        except Exception:  # noqa: BLE001 - a count is a bonus, never a reason to fail the suite
            out[c.key] = None
    return out


def _then_clear(prepare: Callable[[], None] | None, scratch: dict[str, Any]) -> Callable[[], None]:
    """Frees the previous case's graph before this case is prepared."""

    def fn() -> None:
        scratch.clear()
        if prepare is not None:
            prepare()

    return fn


def _nbytes(ts: Sequence[torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in ts))


def _steps(hopt: hg.HyperOptimizer, prob: Problem, n: int) -> None:
    """``n`` inner steps on the training batches in turn (returns nothing: a measured window must
    not keep its losses alive)."""
    for i in range(n):
        hopt.step(prob.train_batches[i % len(prob.train_batches)])


def _hyper(hopt: hg.HyperOptimizer, prob: Problem) -> None:
    hopt.hyper_step(train_batch=prob.train_batch, val_batch=prob.val_batch)


def held_between(prob: Problem, args: argparse.Namespace, mem: Memory) -> dict[str, Any]:
    """Measures (inside ``mem``'s session) Implicit's hyperstep peak after N inner steps, and what
    each method keeps alive between hypersteps, with hypersteps every K steps; :func:`_resolve`
    turns the windows into bytes once the session has ended."""
    out: dict[str, Any] = {}
    hopt = prob.implicit(hg.Neumann(steps=5, alpha=LR))
    rows = []
    for n in args.between:
        steps, _ = mem(lambda n=n: _steps(hopt, prob, n))
        peak, _ = mem(lambda: _hyper(hopt, prob))
        rows.append({"inner_steps": n, "steps": steps, "hyperstep": peak})
    out["implicit_peak_vs_inner_steps"] = rows
    # a snapshot of the state a replay starts from: weights, buffers, optimiser state (the
    # hyperparameters, as many bytes as the weights here, are listed apart)
    state = [t for s in prob.inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    out["snapshot_bytes"] = _nbytes(prob.weights) + _nbytes(list(prob.model.buffers())) + _nbytes(state)
    out["hparam_bytes"] = _nbytes(prob.hparams)
    out["batch_bytes"] = _nbytes(list(prob.train_batch))
    K = max(UNROLLED_KS)
    runs = [("implicit", 5, 5, args.cycles)] + [(f"unrolled/k-{k}", k, k, args.cycles) for k in UNROLLED_KS]
    # overlapping windows: a hyperstep after every step (K + 2 cycles reach the steady state)
    runs.append((f"unrolled/k-{K}/every-1", K, 1, max(args.cycles, K + 2)))
    for label, k, every, n_cycles in runs:
        hh: hg.HyperOptimizer = hopt if label == "implicit" else prob.unrolled(k)
        cycles = []
        for _ in range(n_cycles):
            w_steps, _ = mem(lambda hh=hh, every=every: _steps(hh, prob, every))
            w_hyper, _ = mem(lambda hh=hh: _hyper(hh, prob))
            cycles.append((w_steps, w_hyper))
        # not the method's: what any hyperstep leaves, the outer optimiser's state and the .grad
        outer = [
            t for st in hh.outer_optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)
        ]
        grads = [h.grad for h in prob.hparams if h.grad is not None]
        out[label] = {
            "steps_between_hypersteps": every,
            "unrolled_steps": k,
            "cycles": cycles,
            "outer_bytes": _nbytes(outer) + _nbytes(grads),
        }
    return out


def _resolve(b: dict[str, Any]) -> dict[str, Any]:
    """:func:`held_between`'s windows as bytes: live bytes relative to each method's first step."""
    if not b:
        return b
    out: dict[str, Any] = {k: b[k] for k in ("snapshot_bytes", "hparam_bytes", "batch_bytes")}
    out["implicit_peak_vs_inner_steps"] = [
        {
            "inner_steps": r["inner_steps"],
            "held_by_steps_bytes": r["steps"].net,
            "hyperstep_peak_bytes": r["hyperstep"].peak,
        }
        for r in b["implicit_peak_vs_inner_steps"]
    ]
    snapshot, batch = b["snapshot_bytes"], b["batch_bytes"]
    full = snapshot + b["hparam_bytes"]
    for label, x in b.items():
        if not isinstance(x, dict) or "cycles" not in x:
            continue
        every, live, cycles = x["steps_between_hypersteps"], 0, []
        k = x.get("unrolled_steps", every)
        for w_steps, w_hyper in x["cycles"]:
            live += w_steps.net
            before = live
            live += w_hyper.net
            cycles.append(
                {
                    "held_before_hyperstep_bytes": before,
                    "held_after_hyperstep_bytes": live,
                    "hyperstep_peak_bytes": w_hyper.peak,
                }
            )
        last = cycles[-1]["held_before_hyperstep_bytes"]
        # what hg.Unrolled documents: 2 full snapshots (weights, buffers, optimiser state and
        # hyperparameters) and at most 2K batches; with hypersteps more often than every K steps,
        # also a copy of the hyperparameters per recorded step (K + s of them); besides, what any
        # hyperstep leaves (the outer optimiser's state, the hyperparameters' .grad)
        bound = 2 * full + 2 * k * batch + x.get("outer_bytes", 0)
        if every < k:
            bound += (k + every) * b["hparam_bytes"]
        out[label] = {
            "steps_between_hypersteps": every,
            "unrolled_steps": k,
            "cycles": cycles,
            "outer_bytes": x.get("outer_bytes", 0),
            "held_in_snapshots": last / full if full else float("nan"),
            "documented_bound_bytes": 0 if label == "implicit" else bound,
        }
    return out


def bench_model(name: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    prob = make_problem(name, args.size, device, batch=args.batch)
    timer, mem = Timer(device, args.clock), Memory(device)
    n_w, n_h = sum(t.numel() for t in prob.weights), sum(t.numel() for t in prob.hparams)
    log(
        f"\n== {name}: {prob.spec.description}; {n_w:,} weights, {n_h:,} hyperparameters, "
        f"batch {prob.spec.batch}"
    )
    out: dict[str, Any] = {
        "description": prob.spec.description,
        "weights": n_w,
        "hyperparameters": n_h,
        "batch": prob.spec.batch,
        "loadavg_start": _loadavg(),
    }
    t0 = time.perf_counter()
    for _ in range(args.warm_train):
        prob.torch_step()
    cases, objs = build_cases(prob, args)
    live = [c for c in cases if c.error is None]
    for c in live:  # warm-up round: every kernel, the allocator's caches, the Unrolled rings
        assert c.prepare is not None
        c.prepare()
        c.run()
    timer.sync()
    log(f"   set-up and warm-up: {time.perf_counter() - t0:.1f}s")

    flops = count_flops(live)

    secs: dict[str, list[float]] = {c.key: [] for c in live}
    wall: dict[str, list[float]] = {c.key: [] for c in live}
    ratio: dict[str, list[float]] = {c.key: [] for c in live}
    over_floor: dict[str, list[float]] = {c.key: [] for c in live}
    floor_s: dict[str, list[float]] = {c.key: [] for c in live}
    iters: dict[str, list[int]] = {c.key: [] for c in live}
    over_hg: dict[str, list[float]] = {c.key: [] for c in live if c.peer_of}
    prep_s: dict[str, list[float]] = {c.key: [] for c in live if c.prepare_is_work}
    over_hg_steps: dict[str, list[float]] = {c.key: [] for c in live if c.peer_of}
    t_rounds = time.perf_counter()
    n_rounds = 0
    for _ in rounds(args.repeats, args.budget, args.min_repeats):
        n_rounds += 1
        this: dict[str, float] = {}
        infos: dict[str, Any] = {}
        prep: dict[str, float] = {}
        for c in live:
            assert c.prepare is not None
            if c.prepare_is_work:
                p, _ = timer(c.prepare)
                prep[c.key] = p.seconds
                prep_s[c.key].append(p.seconds)
            else:
                c.prepare()
            s, info = timer(c.run)
            this[c.key], infos[c.key] = s.seconds, info
            secs[c.key].append(s.seconds)
            wall[c.key].append(s.wall)
            its = getattr(info, "solver_iterations", None)
            if its is not None:
                iters[c.key].append(int(its))
        u, _ = timer(prob.torch_step)  # the unit again at the end of the round: the mean of both
        unit = 0.5 * (this["train_step"] + u.seconds)
        for c in live:
            ratio[c.key].append(this[c.key] / unit)
            if c.floor is not None:
                info = infos.get(c.peer_of or c.key)
                f = c.floor(this, info)
                floor_s[c.key].append(f)
                over_floor[c.key].append(this[c.key] / f)
            if c.peer_of and c.peer_of in this:
                over_hg[c.key].append(this[c.key] / this[c.peer_of])
                if c.peer_of in prep:  # the peer's call also takes the K steps hypergrad took apart
                    over_hg_steps[c.key].append(this[c.key] / (this[c.peer_of] + prep[c.peer_of]))
    log(f"   {n_rounds} timed rounds in {time.perf_counter() - t_rounds:.1f}s")

    peaks: dict[str, Window] = {}
    between: dict[str, Any] = {}
    if args.memory:
        with mem.session():
            for c in live:  # once unmeasured: .grad, optimiser states and caches reallocated in view
                assert c.prepare is not None
                c.prepare()
                c.run()
            for c in live:
                assert c.prepare is not None
                c.prepare()
                peaks[c.key], _ = mem(c.run)
            between = held_between(prob, args, mem)
        timer.sync()
    train_peak = peaks["train_step"].peak if "train_step" in peaks else None

    rows: dict[str, Any] = {}
    for c in cases:
        if c.error is not None:
            rows[c.key] = {"group": c.group, "error": c.error, "peer_of": c.peer_of}
            log(f"   {c.key:<26} unavailable: {c.error[:100]}")
            continue
        row: dict[str, Any] = {
            "group": c.group,
            "median_ms": 1e3 * median(secs[c.key]),
            "ratio_to_train_step": median(ratio[c.key]),
            "samples_ms": [round(1e3 * x, 4) for x in secs[c.key]],
            "wall_ms": [round(1e3 * x, 4) for x in wall[c.key]],
            "ratio_samples": [round(x, 4) for x in ratio[c.key]],
        }
        if c.peer_of:
            row["peer_of"] = c.peer_of
            row["ratio_to_hypergrad"] = median(over_hg[c.key])
            if over_hg_steps[c.key]:
                row["ratio_to_hypergrad_with_steps"] = median(over_hg_steps[c.key])
        if prep_s.get(c.key):
            row["prepare_ms"] = 1e3 * median(prep_s[c.key])
            row["prepare_samples_ms"] = [round(1e3 * x, 4) for x in prep_s[c.key]]
        if floor_s[c.key]:
            row["floor_ms"] = 1e3 * median(floor_s[c.key])
            row["floor_ratio_to_train_step"] = median(
                [
                    f / r
                    for f, r in zip(
                        floor_s[c.key],
                        [s / q for s, q in zip(secs[c.key], ratio[c.key], strict=True)],
                        strict=True,
                    )
                ]
            )
            row["ratio_to_floor"] = median(over_floor[c.key])
        if iters[c.key]:
            row["solver_iterations"] = iters[c.key]
        if flops.get(c.key) is not None and flops.get("train_step"):
            row["flops"] = flops[c.key]
            row["flops_ratio_to_train_step"] = flops[c.key] / flops["train_step"]
            if flops.get(f"{c.key}:prepare") is not None:
                row["prepare_flops_ratio_to_train_step"] = flops[f"{c.key}:prepare"] / flops["train_step"]
        if c.key in peaks:
            row["peak_bytes"], row["net_bytes"] = peaks[c.key].peak, peaks[c.key].net
            if train_peak:
                row["peak_ratio_to_train_step"] = peaks[c.key].peak / train_peak
        rows[c.key] = row
        log(
            f"   {c.key:<26} {row['median_ms']:10.2f} ms  {row['ratio_to_train_step']:7.2f} steps"
            + (
                f"  floor {row['floor_ratio_to_train_step']:6.2f}  ÷floor {row['ratio_to_floor']:5.2f}"
                if "floor_ms" in row
                else ""
            )
            + (f"  ÷hg {row['ratio_to_hypergrad']:5.2f}" if "ratio_to_hypergrad" in row else "")
            + (
                f"  ÷(hg + its steps) {row['ratio_to_hypergrad_with_steps']:5.2f}"
                if "ratio_to_hypergrad_with_steps" in row
                else ""
            )
            + (f"  FLOPs {row['flops_ratio_to_train_step']:5.2f}" if "flops" in row else "")
            + (f"  peak {row['peak_bytes'] / 2**20:8.2f} MiB" if "peak_bytes" in row else "")
        )
    out["cases"] = rows
    out["rounds"] = n_rounds

    if args.peers:
        agree: dict[str, Any] = {}
        for key, obj in objs.items():
            if key.startswith("torchopt/"):
                try:
                    agree[key] = peers.implicit_agreement(prob, objs["implicit/" + key.split("/")[1]], obj)
                except Exception as e:  # noqa: BLE001
                    agree[key] = {"error": f"{type(e).__name__}: {e}"}
        for k in UNROLLED_KS:
            try:
                agree[f"higher/k-{k}"] = peers.unrolled_agreement(prob, k)
            except Exception as e:  # noqa: BLE001
                agree[f"higher/k-{k}"] = {"error": f"{type(e).__name__}: {e}"}
        out["agreement"] = agree
        log(
            "   agreement (relative difference of the hypergradients): "
            + ", ".join(f"{k} {v.get('rel_diff', float('nan')):.1e}" for k, v in agree.items())
        )
    if args.memory:
        out["between_hypersteps"] = b = _resolve(between)
        log(
            "   implicit hyperstep peak after N inner steps: "
            + ", ".join(
                f"N={r['inner_steps']}: {r['hyperstep_peak_bytes'] / 2**20:.2f} MiB "
                f"(held {r['held_by_steps_bytes']} B)"
                for r in b["implicit_peak_vs_inner_steps"]
            )
        )
        for label in ["implicit"] + [f"unrolled/k-{k}" for k in UNROLLED_KS]:
            log(
                f"   held before a hyperstep, {label}: {b[label]['held_in_snapshots']:.2f} snapshots "
                f"({(b['snapshot_bytes'] + b['hparam_bytes']) / 2**20:.2f} MiB each, hyperparameters "
                "included, as held_in_snapshots counts them)"
            )
    out["loadavg_end"] = _loadavg()
    out["seconds"] = time.perf_counter() - t0
    return with_summary_fields(out)


def with_summary_fields(r: dict[str, Any]) -> dict[str, Any]:
    """Adds the two fields every ``benchmarks/results`` JSON carries per model (tests/test_repository
    reads them): ``train_step.torch_step.median_ms`` (the unit) and ``hypersteps`` (hypergrad's
    hyperstep rows, each with its case name as ``method``)."""
    cases = r.get("cases", {})
    if "train_step" in cases and "error" not in cases["train_step"]:
        r["train_step"] = {"torch_step": {"median_ms": cases["train_step"]["median_ms"]}}
    r["hypersteps"] = [{"method": k, **v} for k, v in cases.items() if v.get("group") == "hypergrad"]
    return r


def log(msg: str) -> None:
    print(msg, flush=True)


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _git(*cmd: str) -> str | None:
    try:
        r = subprocess.run(["git", *cmd], cwd=HERE, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device, args: argparse.Namespace, timer: Timer, mem: Memory) -> dict[str, Any]:
    status = _git("status", "--porcelain", "--", "hypergrad")
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        # fp32 results depend on these (cuDNN convolutions use TF32 unless told not to)
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32 if device.type == "cuda" else None,
        "hypergrad": hg.__version__,
        "peers": dict(peers.VERSIONS),
        "peer_errors": dict(peers.ERRORS),
        "git_commit": _git("rev-parse", "HEAD"),
        "hypergrad_uncommitted_changes": bool(status),
        "clock": timer.clock,
        "memory_metric": mem.metric,
        "loadavg_start": _loadavg(),
    }


def default_out(device: torch.device, size: str, autocast: str = "none") -> Path:
    if device.type == "cuda":
        tag = "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(device).lower()).strip(
            "-"
        )
    else:
        tag = f"cpu-{os.cpu_count()}core"
    amp = "" if autocast == "none" else f"-{autocast}"
    return HERE / "results" / f"suite-{tag}{'' if size == 'small' else '-' + size}{amp}.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="(default: cpu)")
    ap.add_argument(
        "--models", default=",".join(models.MODELS), help=f"comma-separated subset of {models.MODELS}"
    )
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="toy sizes (the smoke test: seconds)")
    size.add_argument("--full", action="store_true", help="GPU sizes: ResNet-18 at batch 128, the ~100M GPT")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds at most (default: 5)")
    ap.add_argument("--min-repeats", type=int, default=3, help="timed rounds at least (default: 3)")
    ap.add_argument(
        "--budget",
        type=float,
        default=90.0,
        help="no new round after this many seconds of rounds, per model (default: 90)",
    )
    ap.add_argument("--batch", type=int, default=None, help="override the size's batch size")
    ap.add_argument(
        "--warm-train", type=int, default=10, help="training steps before the cases (default: 10)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU default: 1)")
    ap.add_argument(
        "--clock",
        default="cpu",
        choices=["cpu", "wall"],
        help="CPU timing: this process's CPU time or wall time (default: cpu; CUDA uses events)",
    )
    ap.add_argument(
        "--autocast",
        default="none",
        choices=["none", "bf16", "fp16"],
        help="run every loss (plain step, hypergrad, peers) under torch.autocast in this dtype "
        "(default: none, float32)",
    )
    ap.add_argument("--no-peers", dest="peers", action="store_false", help="skip torchopt and higher")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory measurements")
    ap.add_argument(
        "--no-variants",
        dest="variants",
        action="store_false",
        help="skip the alternatives (no penalty, forward-over-reverse HVP, unfused outer Adam)",
    )
    ap.add_argument(
        "--between",
        default="1,10,30",
        help="inner steps before a hyperstep, for Implicit's peak (default: 1,10,30)",
    )
    ap.add_argument(
        "--cycles", type=int, default=3, help="(K steps, hyperstep) cycles for held bytes (default: 3)"
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON (default: benchmarks/results/suite-<device>.json)"
    )
    ap.add_argument(
        "--md",
        type=Path,
        default=None,
        help="Markdown table (default: benchmarks/RESULTS.md, from every results/suite-*.json)",
    )
    args = ap.parse_args(argv)
    args.size = "tiny" if args.tiny else "full" if args.full else "small"
    args.autocast_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    args.between = [int(x) for x in str(args.between).split(",") if x.strip()]
    if args.tiny:
        args.between = [n for n in args.between if n <= 10] or [1]
        args.cycles = min(args.cycles, 2)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # CUDA events and memory statistics on this device
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.autocast == "fp16" and device.type == "cpu":
        raise SystemExit("--autocast fp16 is for CUDA; use bf16 on CPU")
    models.AUTOCAST = args.autocast_dtype
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        if n not in models.MODELS:
            raise SystemExit(f"unknown model {n!r}; choose from {models.MODELS}")
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "hypergrad suite",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device, args, Timer(device, args.clock), Memory(device)),
        "settings": {
            "size": args.size,
            "batch_override": args.batch,
            "repeats": args.repeats,
            "min_repeats": args.min_repeats,
            "budget_s": args.budget,
            "warm_train_steps": args.warm_train,
            "inner_optimizer": f"SGD(lr={LR}, momentum={models.MOMENTUM})",
            "outer_optimizer": f"Adam(lr={models.OUTER_LR}, fused=True)",
            "hparams": f"WeightDecay(per='parameter', init={models.WD_INIT})",
            "neumann_alpha": LR,
            "cg": {"maxiter": CG_STEPS, "tol": CG_TOL, "damping": CG_DAMPING},
            "neumann_ks": list(NEUMANN_KS),
            "unrolled_ks": list(UNROLLED_KS),
            "dtype": "float32",
            "autocast": args.autocast,
            "between": args.between,
            "cycles": args.cycles,
            "peers": args.peers,
            "variants": args.variants,
            "memory": args.memory,
        },
        "models": {},
    }
    for n in names:
        results["models"][n] = bench_model(n, device, args)
    results["machine"]["loadavg_end"] = _loadavg()
    results["seconds"] = time.perf_counter() - t0
    out = args.out or default_out(device, args.size, args.autocast)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    if args.md is None:
        md_path = HERE / "RESULTS.md"
        md = report.render_files(sorted((HERE / "results").glob("suite-*.json")))
    else:
        md_path, md = args.md, report.render_files([out])
    md_path.write_text(md)
    log(f"\nwrote {out} and {md_path} ({results['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
