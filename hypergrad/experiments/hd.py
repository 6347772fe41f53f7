"""Experiment 7: hypergradient descent on the learning rate (Baydin et al. 2018).

``hg.optim.SGDHD`` and ``hg.optim.AdamHD`` against ``torch.optim.SGD`` and ``torch.optim.Adam``,
each started from a too-small, a reasonable and a too-large initial learning rate, training an MLP
64-``hidden``-10 on scikit-learn's digits with mini-batches of ``batch_size`` for ``epochs``
epochs from the same initialisation and batch order. Reported: final training loss (full
training set), test accuracy, and the learning rate each HD optimiser ended at. A run whose loss
becomes non-finite stops; it, and a run whose final training loss is 1e6 or more, counts as
diverged: its train loss is recorded as 1e6 in the metrics and the table alike (``diverged``
says which), and its test accuracy is measured like any other's.

Time: ~10 s on a 2-core CPU at the default size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

from .common import (
    STANDARDISED_N_TRAIN,
    Context,
    Limit,
    Outcome,
    accuracy,
    ce_loss,
    digits_split,
    fits,
    plt,
    register,
)


def _optimizer(kind: str, params: Any, lr: float, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if kind == "sgd-hd":
        return hg.optim.SGDHD(params, lr=lr, hypergrad_lr=cfg["beta_sgd"])
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    if kind == "adam-hd":
        return hg.optim.AdamHD(params, lr=lr, hypergrad_lr=cfg["beta_adam"])
    raise ValueError(kind)


@register(
    "hd",
    number=7,
    title="hypergradient descent: SGD-HD / Adam-HD vs SGD / Adam from too-small and too-large learning rates",
    paper="Baydin et al. 2018",
    claim="SGD-HD beats SGD at the same budget from a too-small α₀, α rising on its own; "
    "HD makes the initial learning rate matter less",
    defaults={
        "epochs": 30,
        "batch_size": 50,
        "hidden": 128,
        "n_train": 1000,
        "sgd_lrs": "0.001,0.1,5.0",
        "adam_lrs": "1e-05,0.001,0.1",
        "beta_sgd": 0.001,
        "beta_adam": 1e-05,
        "seed": 0,
    },
    # (quick: 30 steps per optimiser, so that the trajectory, logged every 10th step, and the
    # learning-rate plot have rows: at batch_size 50 each optimiser took 6 steps, and neither had one)
    quick={
        "epochs": 1,
        "hidden": 16,
        "n_train": 300,
        "batch_size": 10,
        "sgd_lrs": "0.001",
        "adam_lrs": "1e-05",
    },
    paper_size={"epochs": 50, "hidden": 1000},
    rules=(fits(("n_train",), 1797, "scikit-learn's digits"),),
    limits={
        "n_train": STANDARDISED_N_TRAIN,
        "sgd_lrs": Limit(0, low_open=True, items=float),
        "adam_lrs": Limit(0, low_open=True, items=float),
    },
)
def run(ctx: Context) -> Outcome:
    """Train with each optimiser from each initial learning rate."""
    cfg = ctx.config
    train, _, test = digits_split(cfg["seed"], cfg["n_train"], 0, ctx.device)
    n = len(train[1])
    jobs: list[tuple[str, float]] = []
    for fam, key in (("sgd", "sgd_lrs"), ("adam", "adam_lrs")):
        for lr in (float(s) for s in str(cfg[key]).split(",") if s.strip()):
            jobs += [(fam, lr), (f"{fam}-hd", lr)]
    steps_per_epoch = (n + cfg["batch_size"] - 1) // cfg["batch_size"]
    metrics: dict[str, float] = {}
    table: list[dict[str, Any]] = []
    curves: dict[tuple[str, float], list[float]] = {}
    lr_curves: dict[tuple[str, float], list[float]] = {}
    for kind, lr0 in ctx.bar(jobs, desc="optimisers"):
        torch.manual_seed(cfg["seed"])
        model = nn.Sequential(nn.Linear(64, cfg["hidden"]), nn.ReLU(), nn.Linear(cfg["hidden"], 10)).to(
            ctx.device
        )
        opt = _optimizer(kind, model.parameters(), lr0, cfg)
        g = ctx.generator(1)
        losses, lrs = [], []
        step = 0
        diverged = False
        for _ in range(cfg["epochs"]):
            order = torch.randperm(n, generator=g).to(ctx.device)
            for i in range(steps_per_epoch):
                idx = order[i * cfg["batch_size"] : (i + 1) * cfg["batch_size"]]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(train[0][idx]), train[1][idx])
                if not torch.isfinite(loss):
                    diverged = True
                    break
                loss.backward()
                opt.step()
                step += 1
                if step % 10 == 0:
                    lr = float(opt.param_groups[0]["lr"])
                    lrs.append(lr)
                    row = {"optimizer": kind, "lr0": lr0, "lr": lr, "loss": float(loss.detach())}
                    ctx.logger.log(row, step=step)
            if diverged:
                break
            losses.append(ce_loss(model, train))
        final = ce_loss(model, train) if not diverged else float("inf")
        diverged = diverged or not final < 1e6  # a non-finite mini-batch loss, or a final >= 1e6 or NaN
        acc = accuracy(model, test)  # measured, diverged or not (chance level or below when it did)
        name = f"{kind}@{lr0:g}"
        lr_end = float(opt.param_groups[0]["lr"])
        train_loss = 1e6 if diverged else final  # diverged runs: 1e6 (and .diverged = 1)
        metrics[f"{name}.train_loss"] = train_loss
        metrics[f"{name}.diverged"] = float(diverged)
        metrics[f"{name}.test_acc"] = acc
        metrics[f"{name}.lr_end"] = lr_end
        curves[(kind, lr0)] = losses
        lr_curves[(kind, lr0)] = lrs
        table.append({"optimizer": kind, "lr0": lr0, "lr end": lr_end, "train loss": train_loss,
                      "diverged": "yes" if diverged else "no", "test acc": acc})  # fmt: skip

    pyplot = plt()
    fams = ("sgd", "adam")
    fig, axes = pyplot.subplots(2, 2, figsize=(12, 8))
    for col, fam in enumerate(fams):
        for j, ((kind, lr0), losses) in enumerate(
            (k, v) for k, v in curves.items() if k[0].split("-")[0] == fam
        ):
            ls = "-" if kind.endswith("hd") else ":"
            axes[0, col].plot(
                range(1, len(losses) + 1), losses, ls=ls, color=f"C{j // 2}", label=f"{kind} α₀={lr0:g}"
            )
            if kind.endswith("hd"):
                axes[1, col].plot(lr_curves[(kind, lr0)], color=f"C{j // 2}", label=f"α₀={lr0:g}")
        axes[0, col].set_yscale("log")
        axes[0, col].set_xlabel("epoch")
        axes[0, col].set_ylabel("training loss")
        axes[0, col].legend(fontsize=8)
        axes[1, col].set_yscale("log")
        axes[1, col].set_xlabel("step / 10")
        axes[1, col].set_ylabel(f"{fam}-hd learning rate")
        axes[1, col].legend(fontsize=8)
    ctx.savefig(fig, "hd")

    def cmp(fam: str, lr0: float) -> str:
        a, b = metrics.get(f"{fam}@{lr0:g}.train_loss"), metrics.get(f"{fam}-hd@{lr0:g}.train_loss")
        if a is None or b is None:
            return ""
        sa = "diverged" if metrics[f"{fam}@{lr0:g}.diverged"] else f"{a:.3g}"
        sb = "diverged" if metrics[f"{fam}-hd@{lr0:g}.diverged"] else f"{b:.3g}"
        end = metrics[f"{fam}-hd@{lr0:g}.lr_end"]
        return f"{fam.upper()} α₀={lr0:g}: train loss {sa}, HD {sb} (α→{end:.2g})"

    parts = []
    for fam, key in (("sgd", "sgd_lrs"), ("adam", "adam_lrs")):
        lrs0 = [float(s) for s in str(cfg[key]).split(",") if s.strip()]
        parts += [cmp(fam, lrs0[0]), cmp(fam, lrs0[-1])] if len(lrs0) > 1 else [cmp(fam, lrs0[0])]
    return Outcome(metrics, table, "; ".join(p for p in parts if p))
