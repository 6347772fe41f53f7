"""Experiment 13: invariance learning by marginal likelihood — a learned range of translations.

Immer et al. (2022) learn data-augmentation parameters (which invariances a model should have)
by gradient ascent on the Laplace marginal likelihood of the training data, with no validation
set: the range of an augmentation grows toward the transformations present in the data.

Setup: scikit-learn's digits (8x8 images / 16) placed on a ``canvas`` x ``canvas`` (12 x 12)
canvas of zeros, each moved by a random whole-pixel translation in [-``max_shift``, ``max_shift``]
(2) on each axis (the canvas has room for it: nothing is cut off), split by the seed into
``n_train`` (1,000) training and the rest (797) test images (translated too). An MLP
144-``hidden``-10 (ReLU, float64): nothing in it knows about translations. Two runs of
``hg.MarginalLikelihood`` on the training set alone, one global prior precision (init 1), Adam
(lr ``lr``, batches of ``batch``, ``steps`` steps), after a burn-in of ``burn_in`` steps one Adam
step (lr ``hyper_lr``) on the hyperparameters every ``every`` steps (one epoch), on the bound of
the step's batch with blocks of M = ``subset`` and one kernel per output (``outputs="each"``):

1. no augmentation;
2. ``hg.hparams.RandomTranslation((12, 12), init=init_range, max=4)``: the model is the average of
   its outputs over S = ``samples`` randomly translated copies of each image; the translation
   range per axis (vertical, horizontal) is learned with the precision. At test time it predicts
   with 16 samples.

Claim: the range grows from 0.2 px toward the 2 px in the data and the augmented model's test
accuracy beats the one without.

Why this setup (the earlier one, 8x8 images translated in place by up to 2 px, N = 500, S = 4,
M = 50, one precision per layer, 1,500 steps, reached 40% / 44% with a range of 0.3 / 0.8 px):

* One precision per layer drifts: the first layer's grows without bound (1 -> 170 in 1,500
  steps, no augmentation) while the last layer's falls, a direction along which a ReLU network's
  rescaling symmetry leaves the function unchanged; the network ends over-regularised (40%).
  A global precision settles (within ~100 hypersteps).
* The translations of the old data cut up to 2 of 8 rows and columns off a digit; on the 12 x 12
  canvas the information is all there, and augmentation can restore it (with the precision held
  at 0.3 and no learning, N = 500, on another seed's split: 64% without, 89% with a range of 2 px).
* S = 4 samples made the range stall at ~0.6 px (N = 500, even at M = 500): the average of
  few randomly translated copies is a noisy model, and its likelihood falls as the range grows.
  With S = 8 (16) it reached 2.7 (3.5) px horizontally (M = 100 (50); development split, seed
  100, not reported).
* The bound's looseness raises the learned precision (small blocks count more effective
  parameters): no augmentation, M = 50 / 100 / 250 ("all" outputs) end at 11.7 / 9.7 / 7.2 and
  "each" at M = 100 at 13.5 (N = 1,000, development split). ``outputs="each"`` at M = 100 is the
  affordable choice with S = 8 (a hyperstep ~0.5 s; "all" at M = 50 ~2.3 s). Both runs are
  therefore more regularised than the accuracy-optimal precision: the claim compares them under
  the same learned-precision method. More data (1,000 instead of 500 images) and 3,000 steps
  (300 epochs) let the range keep growing as the precision falls.

The development split (seed 100) chose S, M, the canvas, ``n_train`` and ``steps``; the reported
run (seed 0) was run once with them.

Result (seed 0): the accuracy half of the claim is met clearly, the range half on one axis. The
horizontal range grows from 0.2 to 2.57 px (past the 2 px in the data: a range r draws shifts
uniformly in [-r, r], so r > 2 still covers them), the vertical one only to 0.88 px; test accuracy
86.32% with the learned translation against 76.41% without (+9.9 points), at learned precisions
6.5 and 13.5. Seeds 1 and 2 (``--seed``, run after the settings were fixed): 82.31% vs 74.03%,
range 1.01 / 2.52 px; 79.17% vs 71.89%, range 0.41 / 2.61 px. The asymmetry comes from the
digits, not the layer: with every image transposed (seed 0) the ranges swap (2.57 / 1.00 px,
86.32% vs 77.16%). A digit spans all 8 rows of its box but rarely all 8 columns, so a vertical
translation changes more of it. Both runs are more regularised than the best fixed precision (see
above), so neither reaches the ~89% that a fixed range of 2 px with the precision at 0.3-1 gets on
the development split.

Time: ~3 min on a 2-core CPU at the default size (the augmented run's hypersteps, ~0.5 s each,
dominate).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

from .common import Context, Limit, Outcome, Rule, fits, plt, register
from .marglik_precision import _value

Split = dict[str, tuple[Tensor, Tensor]]
TEST_SAMPLES = 16


def shifted_digits(seed: int, n_train: int, max_shift: int, canvas: int = 12) -> Split:
    """Digits / 16 (float64) centred on a ``canvas`` x ``canvas`` canvas of zeros, each translated
    by a random whole-pixel shift in ``[-max_shift, max_shift]`` per axis (pixels pushed past the
    canvas' edge are lost), flattened to ``canvas**2`` and shuffled by ``seed``:
    ``{"train", "test"}`` -> ``(x, y)``."""
    from sklearn.datasets import load_digits

    if canvas < 8 or (canvas - 8) % 2:
        raise ValueError(f"Invalid canvas: {canvas} (need an even size >= 8)")
    digits = load_digits()
    g = torch.Generator().manual_seed(seed)
    imgs = torch.tensor(digits.images, dtype=torch.float64) / 16.0
    n, s = len(imgs), max_shift
    big = F.pad(imgs, ((canvas - 8) // 2 + s,) * 4)  # the canvas and room to translate
    dx = torch.randint(-s, s + 1, (n,), generator=g)
    dy = torch.randint(-s, s + 1, (n,), generator=g)
    out = torch.stack(
        [big[i, s - dy[i] : s - dy[i] + canvas, s - dx[i] : s - dx[i] + canvas] for i in range(n)]
    )
    x = out.reshape(n, canvas * canvas)
    y = torch.tensor(digits.target)
    perm = torch.randperm(n, generator=g)
    x, y = x[perm], y[perm]
    return {"train": (x[:n_train], y[:n_train]), "test": (x[n_train:], y[n_train:])}


def train(
    ctx: Context, d: Split, cfg: dict[str, Any], augment: bool
) -> tuple[float, float, list[list[float]], list[list[float]], float]:
    """One run (with or without the learned translation). Logs each hyperstep; returns the test
    and training accuracy, the translation range and the precision after each hyperstep (the
    precision's initial value alone when no hyperstep ran: ``steps`` within ``burn_in``), and the
    mean hyperstep time (s)."""
    x, y = d["train"]
    canvas = cfg["canvas"]
    torch.manual_seed(cfg["seed"])
    model = nn.Sequential(
        nn.Linear(canvas * canvas, cfg["hidden"]), nn.ReLU(), nn.Linear(cfg["hidden"], 10)
    ).double()
    parts: dict[str, nn.Module] = {"prior": hg.hparams.PriorPrecision(model, per="global", init=1.0)}
    if augment:
        parts["shift"] = hg.hparams.RandomTranslation((canvas, canvas), init=cfg["init_range"], max=4.0)
    hp = nn.ModuleDict(parts).double()
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
        every=cfg["every"],
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

    def acc(xy: tuple[Tensor, Tensor]) -> float:
        xs, ys = xy
        with torch.no_grad():
            if augment:
                logits = model(hp["shift"](xs, TEST_SAMPLES)).reshape(len(ys), TEST_SAMPLES, -1).mean(1)
            else:
                logits = model(xs)
        return float((logits.argmax(1) == ys).double().mean())

    mean_seconds = seconds / max(1, len(precisions))
    if not precisions:  # no hyperstep: report the precision the run trained with
        precisions.append(_value(hp["prior"]))
    return acc(d["test"]), acc(d["train"]), ranges, precisions, mean_seconds


@register(
    "marglik_invariance",
    number=13,
    cpu_only=True,  # (its data and models live on the CPU, whatever --device says)
    title="a translation range learned by the marginal likelihood on shifted digits (no validation set)",
    paper="Immer et al. 2022 (Invariance learning in deep neural networks with differentiable Laplace)",
    claim="the learned augmentation range grows toward the transformations in the data and the "
    "augmented model generalises better than the one without",
    defaults={
        "n_train": 1000,
        "canvas": 12,
        "max_shift": 2,
        "hidden": 128,
        "steps": 3000,
        "lr": 3e-3,
        "batch": 100,
        "subset": 100,
        "samples": 8,
        "init_range": 0.2,
        "burn_in": 100,
        "every": 10,
        "hyper_lr": 0.05,
        "plot": True,
        "seed": 0,
    },
    quick={"n_train": 300, "steps": 120, "burn_in": 20, "every": 3, "samples": 4, "subset": 50},
    paper_size={"steps": 10000, "hidden": 512, "n_train": 1300},
    limits={"canvas": Limit(8), "init_range": Limit(0, 4.0, low_open=True, high_open=True)},
    rules=(
        fits(("n_train",), 1797, "scikit-learn's digits"),
        Rule(("canvas",), lambda c: c % 2 == 0, "an even canvas (the 8x8 digit is centred on it)"),
        Rule(("subset", "n_train"), lambda m, n: m <= n, "subset <= n_train (a subset of the training set)"),
    ),
)
def run(ctx: Context) -> Outcome:
    """No augmentation against a learned translation range, both by the marginal likelihood."""
    cfg = ctx.config
    d = shifted_digits(cfg["seed"], cfg["n_train"], cfg["max_shift"], cfg["canvas"])
    plain, plain_train, _, prec_plain, s_plain = train(ctx, d, cfg, augment=False)
    aug, aug_train, ranges, prec_aug, s_aug = train(ctx, d, cfg, augment=True)
    final = ranges[-1] if ranges else [cfg["init_range"]] * 2
    metrics: dict[str, float] = {
        "plain.test_acc": plain,
        "augmented.test_acc": aug,
        "plain.train_acc": plain_train,
        "augmented.train_acc": aug_train,
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
            "precision (global)": ", ".join(f"{v:.3g}" for v in (prec_plain[-1] if prec_plain else [])),
            "train acc": plain_train,
            "test acc": plain,
            "hyperstep (ms)": s_plain * 1e3,
        },
        {
            "method": f"learned translation range (S = {cfg['samples']})",
            "range (px, y / x)": f"{final[0]:.2f} / {final[1]:.2f}",
            "precision (global)": ", ".join(f"{v:.3g}" for v in (prec_aug[-1] if prec_aug else [])),
            "train acc": aug_train,
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
            a2.plot([p[0] for p in prec], label=label)
        a2.set_yscale("log")
        a2.set_xlabel("hyperstep")
        a2.set_ylabel("prior precision (global)")
        a2.set_title("learned precisions")
        a2.legend(fontsize=8)
        fig.tight_layout()
        ctx.savefig(fig, "marglik_invariance")
    headline = (
        f"range {cfg['init_range']:g} px -> {final[0]:.2f} / {final[1]:.2f} px (y / x; data: "
        f"{cfg['max_shift']} px); test acc learned translation {aug:.2%} vs no augmentation {plain:.2%} "
        f"(learned precisions {metrics['augmented.precision.0']:.3g} / {metrics['plain.precision.0']:.3g})"
    )
    return Outcome(metrics, table, headline)
