"""Experiment 3: dataset distillation — one learned 8x8 image per class (Wang et al. 2018;
Lorraine et al. 2020 with implicit differentiation; here unrolled episodes).

The hyperparameters are 10 images (``hg.hparams.Hparam(..., "real", shape=(10, 64))``, 640
numbers, in the standardised pixel space of scikit-learn's digits) with fixed labels 0-9. Each
episode re-initialises an MLP 64-``hidden``-10 (new random weights), calls
``hopt.start_episode()``, takes ``inner_steps`` SGD steps (lr ``inner_lr``) on the 10 images only,
and ``hyper_step`` differentiates the cross-entropy on a random batch of real training digits
through all of those steps (``hg.Unrolled(steps=inner_steps)``); Adam moves the images.

Test: ``eval_inits`` freshly initialised networks trained the same way (``inner_steps`` steps) on
(a) the learned images, (b) one random real training image per class (also trained to
convergence, 300 steps, as a fairer baseline); mean test accuracy on the held-out digits.

Time: ~1-2 min on a 2-core CPU at the default size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

from .common import STANDARDISED_N_TRAIN, Context, Outcome, digits_split, fits, plt, register


def _model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _reinit(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()


def distilled_loss(model: nn.Module, hparams: nn.Module, batch: Any) -> Tensor:
    """Cross-entropy of the model on the learned images (labels 0..9); ``batch`` is the labels."""
    return F.cross_entropy(model(hparams()), batch)


def real_loss(model: nn.Module, hparams: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """Cross-entropy on a batch of real digits."""
    return F.cross_entropy(model(batch[0]), batch[1])


def train_on(
    images: Tensor, labels: Tensor, test: tuple[Tensor, ...], cfg: dict[str, Any], steps: int, seed: int
) -> float:
    """Mean test accuracy over ``eval_inits`` networks trained ``steps`` SGD steps on ``images``."""
    accs = []
    for i in range(cfg["eval_inits"]):
        torch.manual_seed(seed + 1000 + i)
        model = _model(cfg["hidden"]).to(images.device)
        opt = torch.optim.SGD(model.parameters(), lr=cfg["inner_lr"])
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
            opt.step()
        with torch.no_grad():
            accs.append(float((model(test[0]).argmax(-1) == test[1]).float().mean()))
    return sum(accs) / len(accs)


@register(
    "distill",
    number=3,
    title="dataset distillation: one learned 8x8 image per class on digits vs 10 real images",
    paper="Wang et al. 2018; Lorraine et al. 2020",
    claim="a network trained only on the learned images is far better than one trained on as many "
    "real images (MNIST, one image per class: 7,840 hyperparameters)",
    defaults={
        "episodes": 400,
        "inner_steps": 10,
        "inner_lr": 0.1,
        "hyper_lr": 0.05,
        "hidden": 64,
        "val_batch": 256,
        "eval_inits": 10,
        "n_train": 1000,
        "seed": 0,
    },
    quick={"episodes": 15, "inner_steps": 3, "eval_inits": 2},
    paper_size={"episodes": 5000, "inner_steps": 30, "hidden": 256},
    limits={"n_train": STANDARDISED_N_TRAIN},
    rules=(fits(("n_train",), 1797, "scikit-learn's digits"),),
)
def run(ctx: Context) -> Outcome:
    """Learn 10 images by unrolled episodes; evaluate networks trained on them."""
    cfg = ctx.config
    train, _, test = digits_split(cfg["seed"], cfg["n_train"], 0, ctx.device)
    labels = torch.arange(10, device=ctx.device)
    g = ctx.generator(3)
    # one random real training image per class (the baseline): the training set is shuffled, so
    # one of a class's first 10 (or fewer) examples is a uniformly random one
    pick_list = []
    for c in range(10):
        members = torch.nonzero(train[1] == c).reshape(-1)
        if len(members) == 0:
            raise ValueError(
                f"n_train={cfg['n_train']} digits hold no example of class {c} (seed {cfg['seed']}): "
                "the real-image baseline needs one per class; use a larger n_train"
            )
        pick_list.append(members[torch.randint(0, min(10, len(members)), (1,), generator=g)].reshape(()))
    pick = torch.stack(pick_list)
    real = train[0][pick]
    images = hg.hparams.Hparam(torch.randn(10, 64, generator=g).to(ctx.device) * 0.5, "real")
    torch.manual_seed(cfg["seed"])
    model = _model(cfg["hidden"]).to(ctx.device)
    inner = torch.optim.SGD(model.parameters(), lr=cfg["inner_lr"])
    outer = torch.optim.Adam(images.parameters(), lr=cfg["hyper_lr"])
    hopt = hg.Unrolled(
        model,
        images,
        distilled_loss,
        real_loss,
        inner_optimizer=inner,
        outer_optimizer=outer,
        steps=cfg["inner_steps"],
    )
    n = len(train[1])
    for ep in ctx.bar(range(1, cfg["episodes"] + 1), desc="distillation episodes"):
        _reinit(model)
        hopt.start_episode()
        for _ in range(cfg["inner_steps"]):
            loss = hopt.step(labels)
        idx = torch.randint(0, n, (cfg["val_batch"],), generator=g).to(ctx.device)
        info = hopt.hyper_step(val_batch=(train[0][idx], train[1][idx]))
        ctx.logger.hyper_step(info, step=ep, distilled_train_loss=float(loss))

    learned = images.value.detach().clone()  # Hparam("real").value is the raw Parameter itself (core bug)
    k = cfg["inner_steps"]
    metrics = {
        "learned.test_acc": train_on(learned, labels, test, cfg, k, cfg["seed"]),
        "real.test_acc": train_on(real, labels, test, cfg, k, cfg["seed"]),
        "real_300_steps.test_acc": train_on(real, labels, test, cfg, 300, cfg["seed"]),
        "final_outer_loss": ctx.logger.history[-1]["outer_loss"],
    }
    table = [
        {"trained on": f"10 learned images ({k} steps)", "test acc": metrics["learned.test_acc"]},
        {"trained on": f"10 random real images ({k} steps)", "test acc": metrics["real.test_acc"]},
        {"trained on": "10 random real images (300 steps)", "test acc": metrics["real_300_steps.test_acc"]},
    ]
    pyplot = plt()
    fig, axes = pyplot.subplots(2, 10, figsize=(12, 3))
    for c in range(10):
        for row, src, name in ((0, learned, "learned"), (1, real, "real")):
            ax = axes[row, c]
            ax.imshow(src[c].reshape(8, 8).cpu().numpy(), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
            if row == 0:
                ax.set_title(str(c))
    fig.suptitle(
        f"digits distilled to one image per class: test acc {metrics['learned.test_acc']:.1%} "
        f"(10 real images: {metrics['real.test_acc']:.1%})"
    )
    ctx.savefig(fig, "distilled_images")
    fig, ax = pyplot.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in ctx.logger.history], [r["outer_loss"] for r in ctx.logger.history])
    ax.set_xlabel("episode")
    ax.set_ylabel("loss on real digits after the episode")
    ax.set_yscale("log")
    ctx.savefig(fig, "outer_loss")
    headline = (
        f"test acc of a network trained {k} steps on 10 learned images {metrics['learned.test_acc']:.1%} vs "
        f"10 real images {metrics['real.test_acc']:.1%} "
        f"({metrics['real_300_steps.test_acc']:.1%} after 300 steps)"
    )
    return Outcome(metrics, table, headline)
