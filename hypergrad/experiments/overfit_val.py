"""Experiment 2: overfit a small validation set with one weight decay per weight.

Lorraine et al. (2020) show that per-weight decays are really millions of hyperparameters being
optimised: tuned on ~50 validation examples, they drive the validation loss to ~0 and the
validation accuracy to 100% — an overfit of the validation set, visible against the test set.

Setup: scikit-learn's digits, ``n_train`` training / ``n_val`` (50) validation / the rest test; an
MLP 64-``hidden``-10 trained full-batch by SGD with momentum; one decay per weight
(``hg.hparams.WeightDecay(per="parameter")``, 9,610 hyperparameters at hidden=128), moved by Adam
on the log-decays every ``hyper_every`` inner steps with the chosen method:
``neumann`` / ``cg`` / ``identity`` (``hg.Implicit``, ``solver_steps`` HVPs) or ``unrolled``
(``hg.Unrolled(steps=solver_steps)``). Beside it: the same network trained with no decay.

Time: ~20-40 s on a 2-core CPU at the default size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

from .common import (
    DIGITS_FIT,
    STANDARDISED_N_TRAIN,
    Context,
    Limit,
    Outcome,
    accuracy,
    ce_loss,
    digits_split,
    hyperstep_cost,
    plt,
    register,
)

METHODS = ("neumann", "cg", "identity", "unrolled")


def make_model(hidden: int, seed: int, device: torch.device) -> nn.Module:
    """MLP 64-hidden-10 (ReLU), initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).to(device)


def cross_entropy(model: nn.Module, hparams: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """The validation loss: mean cross-entropy."""
    return F.cross_entropy(model(batch[0]), batch[1])


def regularised(model: nn.Module, hparams: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """The training loss: cross-entropy plus the per-weight penalty."""
    assert isinstance(hparams, hg.hparams.WeightDecay)
    return cross_entropy(model, hparams, batch) + hparams.penalty(model)


def make_hyperoptimizer(
    method: str,
    model: nn.Module,
    hp: nn.Module,
    train_loss: Callable[..., Tensor],
    val_loss: Callable[..., Tensor],
    inner: torch.optim.Optimizer,
    outer: torch.optim.Optimizer,
    solver_steps: int,
) -> hg.HyperOptimizer:
    """``hg.Implicit`` with Neumann / CG / Identity, or ``hg.Unrolled``, with ``solver_steps``."""
    if method == "unrolled":
        return hg.Unrolled(
            model, hp, train_loss, val_loss, inner_optimizer=inner, outer_optimizer=outer, steps=solver_steps
        )
    solver: hg.LinearSolver
    if method == "neumann":
        solver = hg.Neumann(steps=solver_steps)
    elif method == "cg":
        solver = hg.CG(maxiter=solver_steps, tol=1e-6, damping=1e-3)
    elif method == "identity":
        solver = hg.Identity()
    else:
        raise ValueError(f"unknown method {method!r}; methods: {METHODS}")
    return hg.Implicit(
        model, hp, train_loss, val_loss, inner_optimizer=inner, outer_optimizer=outer, solver=solver
    )


def train_global(
    decay: float, data: Any, cfg: dict[str, Any], device: torch.device, epochs: int | None = None
) -> nn.Module:
    """Plain training with one global decay (SGD's ``weight_decay``): the black-box baselines' unit."""
    train = data[0]
    model = make_model(cfg["hidden"], cfg["seed"], device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["inner_lr"], momentum=0.9, weight_decay=decay)
    for _ in range(cfg["epochs"] if epochs is None else epochs):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(train[0]), train[1]).backward()
        opt.step()
    return model


def train_per_weight(
    ctx: Context, data: Any, cfg: dict[str, Any], *, log: bool = True
) -> tuple[nn.Module, hg.hparams.WeightDecay, list[dict[str, float]]]:
    """Train with one decay per weight tuned online by the chosen method; returns the model, the
    decays and the trajectory (one row per hyperstep)."""
    train, val, _ = data
    model = make_model(cfg["hidden"], cfg["seed"], ctx.device)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=cfg["init_decay"])
    inner = torch.optim.SGD(model.parameters(), lr=cfg["inner_lr"], momentum=0.9)
    outer = torch.optim.Adam(hp.parameters(), lr=cfg["hyper_lr"])
    hopt = make_hyperoptimizer(
        cfg["method"], model, hp, regularised, cross_entropy, inner, outer, cfg["solver_steps"]
    )
    rows: list[dict[str, float]] = []
    for epoch in ctx.bar(range(1, cfg["epochs"] + 1), desc=f"per-weight decay ({cfg['method']})"):
        loss = hopt.step(train)
        if epoch % cfg["hyper_every"] == 0:
            info = hopt.hyper_step(train_batch=train, val_batch=val)
            row = {"val_acc": accuracy(model, val), "train_loss": float(loss)}
            if log:
                ctx.logger.hyper_step(info, hparams=hp, step=epoch, **row)
            rows.append({"step": epoch, "val_loss": info.outer_loss, "cost": hyperstep_cost(info), **row})
    return model, hp, rows


@register(
    "overfit_val",
    number=2,
    title="overfit ~50 validation digits with one weight decay per weight (9,610 hyperparameters)",
    paper="Lorraine et al. 2020 (Fig. 'overfitting a small validation set')",
    claim="validation accuracy 100% and validation loss near 0, test accuracy much lower",
    defaults={
        "method": "neumann",
        "solver_steps": 5,
        "hyper_lr": 0.1,
        "hyper_every": 5,
        "epochs": 1500,
        "n_train": 500,
        "n_val": 50,
        "hidden": 128,
        "inner_lr": 0.1,
        "init_decay": 1e-3,
        "seed": 0,
    },
    quick={"epochs": 40, "hidden": 32},
    paper_size={"epochs": 5000, "hidden": 512},
    methods=METHODS,
    limits={"init_decay": Limit(0, low_open=True), "n_train": STANDARDISED_N_TRAIN},
    rules=(DIGITS_FIT,),
)
def run(ctx: Context) -> Outcome:
    """Per-weight decays tuned on 50 validation digits, against no decay."""
    cfg = ctx.config
    data = digits_split(cfg["seed"], cfg["n_train"], cfg["n_val"], ctx.device)
    _, val, test = data
    base = train_global(0.0, data, cfg, ctx.device)
    model, hp, rows = train_per_weight(ctx, data, cfg)
    metrics = {
        "val_acc": accuracy(model, val),
        "val_loss": ce_loss(model, val),
        "test_acc": accuracy(model, test),
        "test_loss": ce_loss(model, test),
        "baseline.val_acc": accuracy(base, val),
        "baseline.val_loss": ce_loss(base, val),
        "baseline.test_acc": accuracy(base, test),
        "baseline.test_loss": ce_loss(base, test),
        "n_hparams": float(sum(p.numel() for p in hp.parameters())),
    }
    table = [
        {
            "method": "no weight decay",
            "val loss": metrics["baseline.val_loss"],
            "val acc": metrics["baseline.val_acc"],
            "test loss": metrics["baseline.test_loss"],
            "test acc": metrics["baseline.test_acc"],
        },
        {
            "method": f"per-weight decay ({cfg['method']}, {int(metrics['n_hparams']):,} hparams)",
            "val loss": metrics["val_loss"],
            "val acc": metrics["val_acc"],
            "test loss": metrics["test_loss"],
            "test acc": metrics["test_acc"],
        },
    ]
    pyplot = plt()
    fig, (a1, a2) = pyplot.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in rows]
    a1.plot(steps, [r["val_loss"] for r in rows], label="validation loss (outer objective)")
    a1.axhline(metrics["baseline.val_loss"], color="gray", ls=":", label="no decay (final)")
    a1.set_yscale("log")
    a1.set_xlabel("inner step")
    a1.legend()
    a1.grid(alpha=0.3, which="both")
    a2.plot(steps, [r["val_acc"] for r in rows], label="validation accuracy")
    a2.axhline(metrics["test_acc"], color="C1", ls="--", label="test accuracy (final)")
    a2.set_xlabel("inner step")
    a2.legend()
    a2.grid(alpha=0.3)
    fig.suptitle(f"digits, {cfg['n_val']} validation examples, one decay per weight ({cfg['method']})")
    ctx.savefig(fig, "overfit_val")
    headline = (
        f"val acc {metrics['val_acc']:.0%}, val loss {metrics['val_loss']:.3f} "
        f"(no decay: {metrics['baseline.val_acc']:.0%}, {metrics['baseline.val_loss']:.3f}); "
        f"test acc {metrics['test_acc']:.1%} (no decay {metrics['baseline.test_acc']:.1%})"
    )
    return Outcome(metrics, table, headline)
