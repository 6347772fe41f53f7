"""Experiment 11: self-tuning dropout and shift augmentation on mnist1d vs a grid of fixed rates.

MacKay et al. (2019) tune dropout rates and augmentation online with a Self-Tuning Network
(``hg.SelfTuning``): in one training run, the STN's schedule beats the best fixed value of a
grid, and an ordinary network retrained on that schedule beats the schedule's final values held
fixed (the schedule itself helps).

Setup: ``mnist1d.data.make_dataset`` (generated, nothing downloaded; the package's default
arguments with the seed): 40-sample 1-D signals in 10 classes. Of its 4,000 training signals,
``n_train`` (1,500) train and 1,000 validate; its 1,000 test signals test. An MLP 40-256-256-10
(ReLU), dropout after each hidden layer, Adam (lr 1e-3), batches of 128, ``epochs`` epochs, every
run from the same initialisation.

* Fixed grid: the shared dropout rates of ``grid``, no augmentation, ordinary ``nn.Linear``.
* Self-tuning: the hidden layers are ``hg.nn.StnLinear``; tuned online: two dropout rates
  (``Rate(0.1, high=0.9)``) and, with ``shift``, the maximum random shift of the input
  (``Integer(0, 0, 12)``, a discrete augmentation applied by ``hg.nn.random_shift``). T_train = 2
  inner steps, then one hyperstep (Adam, lr ``hyper_lr``, entropy weight 1e-3) on a validation
  batch. ``delta`` runs Delta-STN's centred form.
* Retraining: an ordinary MLP trained from scratch on the STN's schedule, against the same MLP at
  the schedule's final values held fixed.
* Model selection is the same for every run: the epoch with the lowest validation loss.
  ``shift=false`` tunes the two dropout rates only (like for like with the grid).

Time: ~2-5 min on a 2-core CPU at the default size (11 runs of 100 epochs, one thread).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

from .common import Context, Outcome, plt, register

Batch = tuple[Tensor, Tensor]
Schedule = Callable[[int], tuple[tuple[float, float], int]]
HIDDEN = 256
MAX_SHIFT = 12
BATCH = 128


@dataclasses.dataclass
class Data:
    """Training, validation and test ``(x, y)``."""

    train: Batch
    val: Batch
    test: Batch


def load_data(seed: int, n_train: int) -> Data:
    """mnist1d (generated from ``seed``), standardised; ``n_train`` train / 1000 val / its test."""
    from mnist1d.data import get_dataset_args, make_dataset  # generated data, no download

    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)
    x = torch.as_tensor(d["x"], dtype=torch.float32)
    y = torch.as_tensor(d["y"], dtype=torch.long)
    mean, std = x.mean(), x.std()
    xt = torch.as_tensor(d["x_test"], dtype=torch.float32)
    yt = torch.as_tensor(d["y_test"], dtype=torch.long)
    return Data(
        ((x[:n_train] - mean) / std, y[:n_train]),
        ((x[n_train : n_train + 1000] - mean) / std, y[n_train : n_train + 1000]),
        ((xt - mean) / std, yt),
    )


class PlainMLP(nn.Module):
    """40-256-256-10 with per-step dropout rates and shift set from outside (``self.rates``)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(40, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, 10)
        self.rates = (0.0, 0.0)
        self.shift = 0

    def forward(self, x: Tensor) -> Tensor:
        """Logits (shift and dropout applied in training mode)."""
        x = hg.nn.random_shift(x, self.shift, self.training) if self.shift else x
        h = hg.nn.dropout(F.relu(self.l1(x)), self.rates[0], self.training)
        h = hg.nn.dropout(F.relu(self.l2(h)), self.rates[1], self.training)
        return self.head(h)


class StnMLP(nn.Module):
    """The same MLP with STN hidden layers; dropout and shift read from the hyperparameters."""

    def __init__(self, n_hparams: int) -> None:
        super().__init__()
        self.l1 = hg.nn.StnLinear(40, HIDDEN, n_hparams)
        self.l2 = hg.nn.StnLinear(HIDDEN, HIDDEN, n_hparams)
        self.head = nn.Linear(HIDDEN, 10)

    def forward(self, x: Tensor, hp: hg.hparams.SelfTuned) -> Tensor:
        """Logits at hyperparameters drawn from ``hp`` (one draw per example)."""
        d = hp.draw(len(x))
        if "shift" in d.values:
            x = hg.nn.random_shift(x, d["shift"], self.training)
        h = hg.nn.dropout(F.relu(self.l1(x, d)), d["dropout"][:, 0], self.training)
        h = hg.nn.dropout(F.relu(self.l2(h, d)), d["dropout"][:, 1], self.training)
        return self.head(h)


def stn_hparams(shift: bool = True) -> hg.hparams.SelfTuned:
    """Two dropout rates (from 0.1), and with ``shift`` the maximum input shift (from 0)."""
    if not shift:
        return hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.1, high=0.9, size=2))
    return hg.hparams.SelfTuned(
        dropout=hg.hparams.Rate(0.1, high=0.9, size=2), shift=hg.hparams.Integer(0, 0, MAX_SHIFT)
    )


def init_plain(stn: StnMLP) -> PlainMLP:
    """An ordinary MLP with the STN's elementary weights (the same initialisation)."""
    plain = PlainMLP()
    with torch.no_grad():
        for p_layer, s_layer in ((plain.l1, stn.l1), (plain.l2, stn.l2)):
            p_layer.weight.copy_(s_layer.weight[:HIDDEN])
            p_layer.bias.copy_(s_layer.bias[:HIDDEN])  # type: ignore[index]
        plain.head.load_state_dict(stn.head.state_dict())
    return plain


@dataclasses.dataclass
class Result:
    """A run at its best validation epoch, its inner steps and its validation-loss curve."""

    name: str
    val_loss: float
    val_acc: float
    test_loss: float
    test_acc: float
    inner_steps: int
    epoch: int
    curve: list[float]


def evaluate(forward: Callable[[Tensor], Tensor], batch: Batch) -> tuple[float, float]:
    """Cross-entropy and accuracy."""
    with torch.no_grad():
        out = forward(batch[0])
        return float(F.cross_entropy(out, batch[1])), float((out.argmax(1) == batch[1]).float().mean())


def batches(data: Batch, size: int, gen: torch.Generator) -> list[Batch]:
    """One epoch of random batches of ``size``."""
    perm = torch.randperm(len(data[0]), generator=gen)
    return [(data[0][perm[i : i + size]], data[1][perm[i : i + size]]) for i in range(0, len(perm), size)]


class Tracker:
    """Early stopping on validation loss: keep the best epoch's validation and test numbers."""

    def __init__(self, name: str) -> None:
        self.best: Result | None = None
        self.name, self.steps = name, 0
        self.curve: list[float] = []

    def update(self, forward: Callable[[Tensor], Tensor], data: Data, epoch: int, steps: int) -> None:
        """Evaluate after ``epoch`` (0-based), ``steps`` inner steps in."""
        vl, va = evaluate(forward, data.val)
        self.curve.append(vl)
        if self.best is None or vl < self.best.val_loss:
            tl, ta = evaluate(forward, data.test)
            self.best = Result(self.name, vl, va, tl, ta, steps, epoch + 1, self.curve)
        self.steps = steps

    def result(self) -> Result:
        """The best epoch's result, with the whole curve and the total inner steps."""
        assert self.best is not None
        self.best.curve, self.best.inner_steps = self.curve, self.steps
        return self.best


def train_plain(
    ctx: Context | None, name: str, model: PlainMLP, data: Data, epochs: int, seed: int, schedule: Schedule
) -> Result:
    """Train an ordinary MLP with the dropout rates and shift of ``schedule(inner_step)``."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 2)
    track, steps = Tracker(name), 0
    for epoch in ctx.bar(range(epochs), desc=name) if ctx is not None else range(epochs):
        model.train()
        for x, y in batches(data.train, BATCH, gen):
            model.rates, model.shift = schedule(steps)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            steps += 1
        model.eval()
        track.update(model, data, epoch, steps)
    return track.result()


def train_stn(
    ctx: Context | None,
    model: StnMLP,
    data: Data,
    epochs: int,
    seed: int,
    delta: bool,
    shift: bool,
    hyper_lr: float = 1e-2,
) -> tuple[Result, hg.hparams.SelfTuned]:
    """Train the STN with its hyperparameters tuned online; returns its result and them."""
    hp = stn_hparams(shift)

    def loss(m: nn.Module, h: nn.Module, b: Batch) -> Tensor:
        return F.cross_entropy(m(b[0], h), b[1])

    hopt = hg.SelfTuning(
        model,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=hyper_lr),
        entropy_weight=1e-3,
        delta=delta,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    vgen = torch.Generator().manual_seed(seed + 3)
    torch.manual_seed(seed + 2)
    track = Tracker("self-tuning" + (" (delta)" if delta else ""))
    vals: list[Batch] = []
    for epoch in ctx.bar(range(epochs), desc=track.name) if ctx is not None else range(epochs):
        model.train()
        for b in batches(data.train, BATCH, gen):
            hopt.step(b)
            if hopt.hyper_due():
                for _ in range(hopt.val_steps):
                    if not vals:
                        vals = batches(data.val, BATCH, vgen)
                    hopt.hyper_step(val_batch=vals.pop())
        model.eval()
        track.update(lambda x: model(x, hp), data, epoch, hopt.inner_steps)
    return track.result(), hp


def schedule_from(history: list[dict[str, float]]) -> Schedule:
    """The STN's schedule as a function of the inner step (the values in force at that step)."""
    steps = [int(r["inner_step"]) for r in history]

    def at(step: int) -> tuple[tuple[float, float], int]:
        i = max(0, sum(1 for s in steps if s <= step) - 1)
        r = history[i] if step >= steps[0] else {"dropout.0": 0.1, "dropout.1": 0.1, "shift": 0.0}
        return (r["dropout.0"], r["dropout.1"]), int(r.get("shift", 0))

    return at


def constant(rates: tuple[float, float], shift: int) -> Schedule:
    """A schedule that never changes."""
    return lambda step: (rates, shift)


def _row(r: Result) -> dict[str, Any]:
    return {
        "run": r.name,
        "val loss": r.val_loss,
        "val acc": r.val_acc,
        "test loss": r.test_loss,
        "test acc": r.test_acc,
        "best epoch": r.epoch,
        "inner steps": r.inner_steps,
    }


@register(
    "stn_mnist1d",
    number=11,
    title="self-tuning dropout and shift augmentation (hg.SelfTuning) on mnist1d vs a grid of fixed rates",
    paper="MacKay et al. 2019 (Self-Tuning Networks); Bae & Grosse 2020 (Delta-STN)",
    claim="in one training run the STN's schedule beats the best fixed hyperparameters of a grid, and "
    "retraining on the schedule beats its final values held fixed",
    defaults={
        "epochs": 100,
        "n_train": 1500,
        "grid": "0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7",
        "shift": True,
        "delta": False,
        "hyper_lr": 1e-2,
        "plot": True,
        "seed": 0,
    },
    quick={"epochs": 2, "grid": "0.0,0.1,0.2"},
    paper_size={"epochs": 300, "n_train": 3000},
)
def run(ctx: Context) -> Outcome:
    """The fixed-rate grid, the STN, and an ordinary MLP retrained on the STN's schedule."""
    cfg = ctx.config
    epochs, seed = cfg["epochs"], cfg["seed"]
    grid = [float(t) for t in cfg["grid"].split(",") if t.strip()]
    data = load_data(seed, cfg["n_train"])
    torch.manual_seed(seed)
    stn0 = StnMLP(stn_hparams(cfg["shift"]).size)
    plain0 = init_plain(stn0)
    fixed = [
        train_plain(
            ctx, f"fixed dropout {p:.1f}", copy.deepcopy(plain0), data, epochs, seed, constant((p, p), 0)
        )
        for p in grid
    ]
    best = min(fixed, key=lambda r: r.val_loss)
    stn, hp = train_stn(
        ctx, copy.deepcopy(stn0), data, epochs, seed, cfg["delta"], cfg["shift"], cfg["hyper_lr"]
    )
    history = hp.history()
    for h in history:
        ctx.logger.log({k: v for k, v in h.items() if k != "inner_step"}, step=int(h["inner_step"]))
    final = history[-1]
    rates = (final["dropout.0"], final["dropout.1"])
    shift = int(final.get("shift", 0))
    retrain = train_plain(
        ctx,
        "retrained with the STN schedule",
        copy.deepcopy(plain0),
        data,
        epochs,
        seed,
        schedule_from(history),
    )
    held = train_plain(
        ctx,
        f"fixed at its final ({rates[0]:.2f}, {rates[1]:.2f}; shift {shift})",
        copy.deepcopy(plain0),
        data,
        epochs,
        seed,
        constant(rates, shift),
    )
    results = [*fixed, stn, retrain, held]
    metrics: dict[str, float] = {}
    for key, r in [
        *((f"fixed@{p:g}", f) for p, f in zip(grid, fixed, strict=True)),
        ("stn", stn),
        ("retrain", retrain),
    ]:
        metrics.update(
            {f"{key}.{k}": getattr(r, k) for k in ("val_loss", "val_acc", "test_loss", "test_acc")}
        )
    metrics.update(
        {f"final_fixed.{k}": getattr(held, k) for k in ("val_loss", "val_acc", "test_loss", "test_acc")}
    )
    metrics["best_fixed.rate"] = grid[fixed.index(best)]
    metrics["stn.dropout.0"], metrics["stn.dropout.1"] = rates
    metrics["stn.shift"] = float(shift)
    metrics["stn.nonfinite"] = float(not all(math.isfinite(v) for v in stn.curve))
    metrics["stn_minus_best.val_loss"] = stn.val_loss - best.val_loss
    metrics["stn_minus_best.test_loss"] = stn.test_loss - best.test_loss
    metrics["retrain_minus_final.val_loss"] = retrain.val_loss - held.val_loss
    metrics["retrain_minus_final.test_loss"] = retrain.test_loss - held.test_loss
    if cfg["plot"]:
        _plot(ctx, history, results, len(batches(data.train, BATCH, torch.Generator())))
    headline = (
        f"val / test loss: STN {stn.val_loss:.4f} / {stn.test_loss:.4f} vs best fixed ({best.name}) "
        f"{best.val_loss:.4f} / {best.test_loss:.4f}; retrained on the schedule {retrain.val_loss:.4f} / "
        f"{retrain.test_loss:.4f} vs its final values fixed {held.val_loss:.4f} / {held.test_loss:.4f} "
        f"(final dropout {rates[0]:.2f} / {rates[1]:.2f}, shift {shift})"
    )
    return Outcome(metrics, [_row(r) for r in results], headline)


def _plot(ctx: Context, rows: list[dict[str, float]], results: list[Result], steps_per_epoch: int) -> None:
    """The STN's dropout schedule, its shift and perturbation scales, and every validation curve."""
    pyplot = plt()
    ep = [r["inner_step"] / steps_per_epoch for r in rows]
    fig, ax = pyplot.subplots(1, 3, figsize=(15, 4))
    for k in ("dropout.0", "dropout.1"):
        ax[0].plot(ep, [r[k] for r in rows], label=k)
    ax[0].set(xlabel="epoch", ylabel="dropout rate", title="STN dropout schedule")
    ax[0].legend()
    if "shift" in rows[0]:
        ax[1].step(ep, [r["shift"] for r in rows], where="post", label="max shift")
    for k in [k for k in rows[0] if k.startswith("sigma.")]:
        ax[1].plot(ep, [r[k] for r in rows], label=k, lw=0.8)
    title = "STN shift (integer) and perturbation scales" if "shift" in rows[0] else "STN perturbation scales"
    ax[1].set(xlabel="epoch", title=title)
    ax[1].legend()
    for r in results:
        ax[2].plot(range(1, len(r.curve) + 1), r.curve, label=r.name, lw=1.5 if "self" in r.name else 0.7)
    ax[2].set(xlabel="epoch", ylabel="validation loss", title="validation loss", ylim=(0.3, 2.0))
    ax[2].legend(fontsize=6)
    fig.tight_layout()
    ctx.savefig(fig, "stn_mnist1d")
