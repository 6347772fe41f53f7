"""Experiment 5: a learned data-augmentation network (Lorraine et al. 2020, section 5.3).

The hyperparameters are the weights of an augmentation network ``a_λ(x, ε)`` (an MLP on the
image and ``noise_dim`` Gaussian noise, output ``x + tanh-bounded residual``: 64+16 → ``aug_hidden``
→ 64; 6k hyperparameters at the default size, starting at the identity). The training loss is
the cross-entropy of the classifier on augmented training images, the validation loss the
cross-entropy on clean validation images; ``hg.Implicit`` with a ``solver_steps``-term Neumann
series moves λ every ``hyper_every`` steps (Adam, ``hyper_lr``). The classifier (an MLP
64-``hidden``-10) is trained on a small training set (``n_train`` digits) so that augmentation can
matter, with a fixed L2 penalty ``decay`` (both runs) that keeps the inner Hessian away from
singular; baseline: the same classifier, same steps and mini-batches, no augmentation.

Time: ~1-2 min on a 2-core CPU at the default size.
"""

from __future__ import annotations

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
    plt,
    register,
)


class Augmenter(nn.Module):
    """``a(x, ε) = x + scale · tanh(MLP([x, ε]))``, the last layer initialised at zero (identity)."""

    def __init__(self, dim: int = 64, noise_dim: int = 16, hidden: int = 64, scale: float = 1.0) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        self.scale = scale
        first, last = nn.Linear(dim + noise_dim, hidden), nn.Linear(hidden, dim)  # init order as Sequential
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
        self.net = nn.Sequential(first, nn.ReLU(), last)

    def forward(self, x: Tensor) -> Tensor:
        eps = torch.randn(x.shape[0], self.noise_dim, device=x.device, dtype=x.dtype)
        return x + self.scale * torch.tanh(self.net(torch.cat([x, eps], 1)))


def l2(model: nn.Module) -> Tensor:
    """½‖w‖² over the classifier's weights."""
    return 0.5 * sum((p.square().sum() for p in model.parameters()), torch.zeros(()))


def augmented_ce(model: nn.Module, hparams: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """Cross-entropy on augmented images plus ``decay``·½‖w‖² (the training loss; ``batch`` is
    ``(x, y, decay)``)."""
    return F.cross_entropy(model(hparams(batch[0])), batch[1]) + batch[2] * l2(model)


def clean_ce(model: nn.Module, hparams: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """Cross-entropy on clean images (the validation loss)."""
    return F.cross_entropy(model(batch[0]), batch[1])


def _classifier(hidden: int, seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).to(device)


@register(
    "augment",
    number=5,
    title="a learned data-augmentation network on digits vs no augmentation",
    paper="Lorraine et al. 2020",
    claim="CIFAR-10 ResNet-18 val/test %: none 92.5/92.6, learned augmentation (Neumann-3) 95.1/94.6 "
    "(recalled)",
    defaults={
        "solver_steps": 5,
        "hyper_lr": 0.0003,
        "hyper_every": 5,
        "steps": 2000,
        "batch_size": 32,
        "n_train": 100,
        "n_val": 300,
        "hidden": 128,
        "aug_hidden": 64,
        "inner_lr": 0.05,
        "decay": 1e-3,
        "seed": 0,
    },
    quick={"steps": 30, "hidden": 32},
    paper_size={"steps": 20000, "n_train": 500},
    limits={"aug_hidden": Limit(1), "n_train": STANDARDISED_N_TRAIN},
    rules=(DIGITS_FIT,),
)
def run(ctx: Context) -> Outcome:
    """Classifier with a learned augmentation network vs without."""
    cfg = ctx.config
    train, val, test = digits_split(cfg["seed"], cfg["n_train"], cfg["n_val"], ctx.device)
    n = len(train[1])
    g = ctx.generator(4)
    decay = torch.tensor(cfg["decay"], device=ctx.device)

    def batches() -> Any:
        for _ in range(cfg["steps"]):
            idx = torch.randint(0, n, (cfg["batch_size"],), generator=g).to(ctx.device)
            yield train[0][idx], train[1][idx], decay

    base = _classifier(cfg["hidden"], cfg["seed"], ctx.device)
    opt = torch.optim.SGD(base.parameters(), lr=cfg["inner_lr"], momentum=0.9)
    for xb, yb, _ in ctx.bar(batches(), desc="no augmentation", total=cfg["steps"]):
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(base(xb), yb) + decay * l2(base)).backward()
        opt.step()

    g.manual_seed(ctx.seed + 4)  # the same mini-batches
    model = _classifier(cfg["hidden"], cfg["seed"], ctx.device)
    torch.manual_seed(ctx.seed + 7)
    aug = Augmenter(hidden=cfg["aug_hidden"]).to(ctx.device)
    hopt = hg.Implicit(
        model,
        aug,
        augmented_ce,
        clean_ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=cfg["inner_lr"], momentum=0.9),
        outer_optimizer=torch.optim.Adam(aug.parameters(), lr=cfg["hyper_lr"]),
        solver=hg.Neumann(steps=cfg["solver_steps"]),
    )
    for step, batch in enumerate(ctx.bar(batches(), desc="learned augmentation", total=cfg["steps"]), 1):
        loss = hopt.step(batch)
        if step % cfg["hyper_every"] == 0:
            info = hopt.hyper_step(train_batch=batch, val_batch=val)
            ctx.logger.hyper_step(info, step=step, train_loss=float(loss))

    metrics = {
        "none.val_acc": accuracy(base, val),
        "none.test_acc": accuracy(base, test),
        "none.test_loss": ce_loss(base, test),
        "learned.val_acc": accuracy(model, val),
        "learned.test_acc": accuracy(model, test),
        "learned.test_loss": ce_loss(model, test),
        "n_hparams": float(sum(p.numel() for p in aug.parameters())),
    }
    table = [
        {"augmentation": "none", "val acc": metrics["none.val_acc"], "test acc": metrics["none.test_acc"],
         "test loss": metrics["none.test_loss"]},
        {"augmentation": f"learned ({int(metrics['n_hparams']):,} hparams)",
         "val acc": metrics["learned.val_acc"], "test acc": metrics["learned.test_acc"],
         "test loss": metrics["learned.test_loss"]},
    ]  # fmt: skip
    pyplot = plt()
    fig, axes = pyplot.subplots(3, 8, figsize=(10, 4))
    with torch.no_grad():
        torch.manual_seed(ctx.seed)
        xs = train[0][:8]
        outs = [xs, aug(xs), aug(xs)]
    for r, (row, name) in enumerate(zip(outs, ("original", "augmented", "augmented"), strict=True)):
        for c in range(8):
            axes[r, c].imshow(row[c].reshape(8, 8).cpu().numpy(), cmap="gray")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name)
    fig.suptitle("learned augmentation on digits (two random draws)")
    ctx.savefig(fig, "augmentations")
    headline = (
        f"test acc none {metrics['none.test_acc']:.1%} vs learned augmentation "
        f"{metrics['learned.test_acc']:.1%} (val {metrics['none.val_acc']:.1%} vs "
        f"{metrics['learned.val_acc']:.1%}; digits, {cfg['n_train']} train)"
    )
    return Outcome(metrics, table, headline)
