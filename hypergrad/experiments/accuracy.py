"""Experiment 1: how accurate each method's hypergradient is, against the exact one.

Problems (float64, from :mod:`hypergrad.testing`): ridge regression with one penalty per feature
(condition number 6.7, as in Grazzi et al. 2020) and L2-penalised logistic regression, both with
a closed-form (or Newton + dense solve) hypergradient. For each method and budget it reports the
relative error ``‖g − g*‖ / ‖g*‖`` and the cosine to ``g*``:

* ``identity``: ``hg.Implicit`` with ``hg.Identity()`` at the inner optimum;
* ``neumann``: ``hg.Implicit`` with ``hg.Neumann(steps=i, alpha=1/λ_max)`` at the inner optimum;
* ``cg``: ``hg.Implicit`` with ``hg.CG(maxiter=k, tol=0)`` at the inner optimum;
* ``unrolled``: ``hg.Unrolled(steps=K)`` through K SGD steps (lr 1/λ_max) from w = 0 (reverse
  mode through the whole trajectory, as Grazzi et al.'s "reverse-mode through t steps").

Time: ~5 s on a 2-core CPU.
"""

from __future__ import annotations

from typing import Any

import torch

import hypergrad as hg
import hypergrad.testing as ht

from .common import Context, Limit, Outcome, plt, register

METHODS = ("identity", "neumann", "cg", "unrolled")


def _problem(name: str, seed: int) -> ht.BilevelProblem:
    if name == "ridge":
        return ht.ridge(n_features=10, cond=6.7, seed=seed)
    if name == "logistic":
        return ht.logistic(n_train=200, n_val=100, n_features=10, seed=seed)
    raise ValueError(f"unknown problem {name!r} (ridge, logistic)")


def _errors(g: tuple[torch.Tensor, ...], exact: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    a = torch.cat([t.reshape(-1) for t in g])
    b = torch.cat([t.reshape(-1) for t in exact])
    rel = float((a - b).norm() / b.norm())
    cos = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))
    return rel, cos


def hypergradient(p: ht.BilevelProblem, method: str, k: int, lam_max: float) -> tuple[torch.Tensor, ...]:
    """The method's hypergradient on problem ``p`` with budget ``k`` (HVPs or unrolled steps)."""
    outer = torch.optim.SGD(p.hparams.parameters(), lr=0.0)
    lr = 1.0 / lam_max
    if method == "unrolled":
        with torch.no_grad():
            for w in p.model.parameters():
                w.zero_()
        inner = torch.optim.SGD(p.model.parameters(), lr=lr)
        hopt: hg.HyperOptimizer = hg.Unrolled(
            p.model,
            p.hparams,
            p.train_loss,
            p.val_loss,
            inner_optimizer=inner,
            outer_optimizer=outer,
            steps=k,
        )
        for _ in range(k):
            hopt.step(p.train_batch)
        grads, _ = hopt.hypergradient(val_batch=p.val_batch)
        return grads
    p.solve_inner()
    solver: hg.LinearSolver
    if method == "identity":
        solver = hg.Identity()
    elif method == "neumann":
        solver = hg.Neumann(steps=k, alpha=lr)
    elif method == "cg":
        solver = hg.CG(maxiter=k, tol=0.0)
    else:
        raise ValueError(f"unknown method {method!r}")
    inner = torch.optim.SGD(p.model.parameters(), lr=lr)
    hopt = hg.Implicit(
        p.model,
        p.hparams,
        p.train_loss,
        p.val_loss,
        inner_optimizer=inner,
        outer_optimizer=outer,
        solver=solver,
    )
    grads, _ = hopt.hypergradient(train_batch=p.train_batch, val_batch=p.val_batch)
    return grads


@register(
    "accuracy",
    number=1,
    cpu_only=True,  # (its data and models live on the CPU, whatever --device says)
    title="hypergradient accuracy: identity, Neumann(i), CG(k), unrolled(K) vs the exact one",
    paper="Grazzi et al. 2020; Lorraine et al. 2020",
    claim="ridge, κ=6.7, rel. error: identity 0.67; Neumann 1/5/20/100: 0.47/0.15/7.6e-3/1.2e-8; "
    "CG 1/5/10/20: 0.23/7.5e-3/8e-5/7e-9",
    defaults={"problems": "ridge,logistic", "steps": "1,2,5,10,20,50,100", "seed": 0},
    quick={"problems": "ridge", "steps": "1,5"},
    paper_size={"steps": "1,2,5,10,20,50,100,200"},
    limits={"problems": Limit(items=str, choices=("ridge", "logistic")), "steps": Limit(1, items=int)},
)
def run(ctx: Context) -> Outcome:
    """Relative error and cosine of each method against the exact hypergradient."""
    problems = [s.strip() for s in str(ctx.config["problems"]).split(",") if s.strip()]
    budgets = sorted({int(s) for s in str(ctx.config["steps"]).split(",") if s.strip()})
    metrics: dict[str, float] = {}
    table: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    jobs = [(pr, m, k) for pr in problems for m in METHODS for k in (budgets if m != "identity" else [0])]
    cache: dict[str, tuple[ht.BilevelProblem, tuple[torch.Tensor, ...], float]] = {}
    for pr, method, k in ctx.bar(jobs, desc="hypergradients"):
        if pr not in cache:
            p = _problem(pr, ctx.seed)
            p.solve_inner()
            lam = torch.linalg.eigvalsh(p.hessian())
            cache[pr] = (p, p.exact_hypergradient(), float(lam.max()))
            metrics[f"{pr}.condition_number"] = float(lam.max() / lam.min())
        p, exact, lam_max = cache[pr]
        rel, cos = _errors(hypergradient(p, method, k, lam_max), exact)
        name = method if method == "identity" else f"{method}({k})"
        metrics[f"{pr}.{name}.rel_error"] = rel
        metrics[f"{pr}.{name}.cosine"] = cos
        curves.setdefault(pr, {}).setdefault(method, []).append((k, rel))
        table.append({"problem": pr, "method": name, "rel error": rel, "cosine": cos})
        ctx.logger.log({"problem": pr, "method": method, "steps": k, "rel_error": rel, "cosine": cos})

    pyplot = plt()
    fig, axes = pyplot.subplots(1, len(problems), figsize=(5.5 * len(problems), 4), squeeze=False)
    for ax, pr in zip(axes[0], problems, strict=True):
        for method, pts in curves[pr].items():
            if method == "identity":
                ax.axhline(pts[0][1], color="gray", ls=":", label="identity")
                continue
            ks, errs = zip(*pts, strict=True)
            ax.plot(ks, [max(e, 1e-16) for e in errs], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("HVPs (Neumann, CG) / unrolled steps")
        ax.set_ylabel("relative error")
        ax.set_title(f"{pr} (κ = {metrics[f'{pr}.condition_number']:.1f})")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    ctx.savefig(fig, "error_vs_steps")

    pr = problems[0]

    def pick(method: str, ks: tuple[int, ...]) -> str:
        """The errors at the paper's budgets ``ks`` that ran, or at every budget that ran when
        none of them did (``--set steps=3`` printed "neumann : ")."""
        have = [k for k in ks if f"{pr}.{method}({k}).rel_error" in metrics] or budgets
        vals = "/".join(f"{metrics[f'{pr}.{method}({k}).rel_error']:.2g}" for k in have)
        return f"{method} {'/'.join(map(str, have))}: {vals}"

    headline = (
        f"{pr}, κ={metrics[f'{pr}.condition_number']:.1f}: "
        f"identity {metrics[f'{pr}.identity.rel_error']:.2f}; "
        f"{pick('neumann', (1, 5, 20, 100))}; {pick('cg', (1, 5, 10, 20))}; {pick('unrolled', (5, 20, 100))}"
    )
    return Outcome(metrics, table, headline)
