"""Experiment 13: invariance learning by marginal likelihood — a learned range of translations.

Immer et al. (2022) learn data-augmentation parameters (which invariances a model should have)
by gradient ascent on the Laplace marginal likelihood of the training data, with no validation
set: the range of an augmentation grows toward the transformations present in the data.

Setup: scikit-learn's digits (8x8 images / 16), every image moved by a random whole-pixel
translation in [-``max_shift``, ``max_shift``] on each axis (zero padding), split once by the
seed into ``n_train`` (500) training and the rest (1,297) test images (shifted too). An MLP
64-``hidden``-10 (ReLU, float64): nothing in it knows about translations. Two runs of
``hg.MarginalLikelihood`` on the training set alone, one precision per layer, Adam (lr ``lr``,
batches of ``batch``), the bound on the step's batch with blocks of M = ``subset`` and one kernel
per output (``outputs="each"``), one Adam step (lr ``hyper_lr``) on the hyperparameters every 5
steps after ``burn_in`` steps:

1. no augmentation;
2. ``hg.hparams.RandomTranslation((8, 8), init=0.2, max=4)``: the model is the average of its
   outputs over S = ``samples`` randomly translated copies of each image; the translation range
   per axis is learned with the precisions. At test time it predicts with 16 samples.

Time: ~1-4 min on a 2-core CPU at the default size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

from .common import Context, Outcome, plt, register
from .marglik_precision import _value

Split = dict[str, tuple[Tensor, Tensor]]
TEST_SAMPLES = 16


def shifted_digits(seed: int, n_train: int, max_shift: int) -> Split:
    """Digits / 16 (float64, flattened to 64), each translated by a random whole-pixel shift in
    ``[-max_shift, max_shift]`` per axis, shuffled by ``seed``: ``{"train", "test"}`` -> ``(x, y)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    g = torch.Generator().manual_seed(seed)
    imgs = torch.tensor(digits.images, dtype=torch.float64) / 16.0
    n, s = len(imgs), max_shift
    padded = F.pad(imgs, (s,) * 4)
    dx = torch.randint(-s, s + 1, (n,), generator=g)
    dy = torch.randint(-s, s + 1, (n,), generator=g)
    out = torch.stack([padded[i, s - dy[i] : s - dy[i] + 8, s - dx[i] : s - dx[i] + 8] for i in range(n)])
    x = out.reshape(n, 64)
    y = torch.tensor(digits.target)
    perm = torch.randperm(n, generator=g)
    x, y = x[perm], y[perm]
    return {"train": (x[:n_train], y[:n_train]), "test": (x[n_train:], y[n_train:])}


def train(
    ctx: Context, d: Split, cfg: dict[str, Any], augment: bool
) -> tuple[float, list[list[float]], list[list[float]], float]:
    """One run (with or without the learned translation). Logs each hyperstep; returns the test
    accuracy, the translation range and the precisions after each hyperstep, and the mean
    hyperstep time (s)."""
    torch.manual_seed(cfg["seed"])
    model = nn.Sequential(nn.Linear(64, cfg["hidden"]), nn.ReLU(), nn.Linear(cfg["hidden"], 10)).double()
    parts: dict[str, nn.Module] = {"prior": hg.hparams.PriorPrecision(model, per="layer", init=1.0)}
    if augment:
        parts["shift"] = hg.hparams.RandomTranslation((8, 8), init=cfg["init_range"], max=4.0)
    hp = nn.ModuleDict(parts).double()
    x, y = d["train"]
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="classification",
        data_size=len(y),
        inner_optimizer=torch.optim.Adam(model.parameters(), lr=cfg["lr"]),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=cfg["hyper_lr"]),
        subset_size=cfg["subset"],
        outputs="each",
        burn_in=cfg["burn_in"],
        every=5,
        augmentation_samples=cfg["samples"] if augment else 1,
    )
    name = "learned translation" if augment else "no augmentation"
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    ranges: list[list[float]] = []
    precisions: list[list[float]] = []
    seconds = 0.0
    order: list[Tensor] = []
    for step in ctx.bar(range(1, cfg["steps"] + 1), desc=name):
        if not order:
            order = list(torch.randperm(len(y), generator=g).split(cfg["batch"]))
        idx = order.pop()
        hopt.step((x[idx], y[idx]))
        if hopt.hyper_step_due():
            info = hopt.hyper_step(train_batch=(x[idx], y[idx]))
            seconds += info.seconds
            prec = _value(hp["prior"])
            precisions.append(prec)
            row: dict[str, Any] = {"run": name, "neg_log_evidence_bound": info.outer_loss}
            row.update({f"precision.{j}": v for j, v in enumerate(prec)})
            if augment:
                rng = _value(hp["shift"])
                ranges.append(rng)
                row.update({"range.y": rng[0], "range.x": rng[1]})
            ctx.logger.log({**row, "hyperstep_seconds": info.seconds}, step=step)
    xt, yt = d["test"]
    with torch.no_grad():
        if augment:
            logits = model(hp["shift"](xt, TEST_SAMPLES)).reshape(len(yt), TEST_SAMPLES, -1).mean(1)
        else:
            logits = model(xt)
    acc = float((logits.argmax(1) == yt).double().mean())
    return acc, ranges, precisions, seconds / max(1, len(precisions))


@register(
    "marglik_invariance",
    number=13,
    title="a translation range learned by the marginal likelihood on shifted digits (no validation set)",
    paper="Immer et al. 2022 (Invariance learning in deep neural networks with differentiable Laplace)",
    claim="the learned augmentation range grows toward the transformations in the data and the "
    "augmented model generalises better than the one without",
    defaults={
        "n_train": 500,
        "max_shift": 2,
        "hidden": 128,
        "steps": 1500,
        "lr": 3e-3,
        "batch": 100,
        "subset": 50,
        "samples": 4,
        "init_range": 0.2,
        "burn_in": 100,
        "hyper_lr": 0.05,
        "plot": True,
        "seed": 0,
    },
    quick={"steps": 40, "burn_in": 20},
    paper_size={"steps": 10000, "hidden": 512, "n_train": 1000},
)
def run(ctx: Context) -> Outcome:
    """No augmentation against a learned translation range, both by the marginal likelihood."""
    cfg = ctx.config
    d = shifted_digits(cfg["seed"], cfg["n_train"], cfg["max_shift"])
    plain, _, prec_plain, s_plain = train(ctx, d, cfg, augment=False)
    aug, ranges, prec_aug, s_aug = train(ctx, d, cfg, augment=True)
    final = ranges[-1] if ranges else [cfg["init_range"]] * 2
    metrics: dict[str, float] = {
        "plain.test_acc": plain,
        "augmented.test_acc": aug,
        "range.y": final[0],
        "range.x": final[1],
        "plain.hyperstep_ms": s_plain * 1e3,
        "augmented.hyperstep_ms": s_aug * 1e3,
    }
    for label, prec in (("plain", prec_plain), ("augmented", prec_aug)):
        for j, v in enumerate(prec[-1] if prec else []):
            metrics[f"{label}.precision.{j}"] = v
    table = [
        {
            "method": "no augmentation",
            "range (px, y / x)": "-",
            "precisions (per layer)": ", ".join(f"{v:.3g}" for v in (prec_plain[-1] if prec_plain else [])),
            "test acc": plain,
            "hyperstep (ms)": s_plain * 1e3,
        },
        {
            "method": f"learned translation range (S = {cfg['samples']})",
            "range (px, y / x)": f"{final[0]:.2f} / {final[1]:.2f}",
            "precisions (per layer)": ", ".join(f"{v:.3g}" for v in (prec_aug[-1] if prec_aug else [])),
            "test acc": aug,
            "hyperstep (ms)": s_aug * 1e3,
        },
    ]
    if cfg["plot"] and ranges:
        pyplot = plt()
        fig, (a1, a2) = pyplot.subplots(1, 2, figsize=(11, 4))
        for j, axis in enumerate(("vertical", "horizontal")):
            a1.plot([t[j] for t in ranges], label=axis)
        a1.axhline(cfg["max_shift"], color="k", linestyle="--", label="translation in the data")
        a1.set_xlabel("hyperstep")
        a1.set_ylabel("learned range (pixels)")
        a1.set_title("invariance learned by the marginal likelihood")
        a1.legend()
        for label, prec in (("no augmentation", prec_plain), ("learned translation", prec_aug)):
            for j in range(len(prec[0]) if prec else 0):
                a2.plot([p[j] for p in prec], label=f"{label}: layer {j}")
        a2.set_yscale("log")
        a2.set_xlabel("hyperstep")
        a2.set_ylabel("prior precision")
        a2.set_title("learned precisions")
        a2.legend(fontsize=7)
        fig.tight_layout()
        ctx.savefig(fig, "marglik_invariance")
    headline = (
        f"range {cfg['init_range']:g} px -> {final[0]:.2f} / {final[1]:.2f} px (y / x; data: "
        f"{cfg['max_shift']} px); test acc learned translation {aug:.2%} vs no augmentation {plain:.2%}"
    )
    return Outcome(metrics, table, headline)
