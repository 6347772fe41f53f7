"""Experiment 10: a best-response hypernetwork recovers the validation-optimal ridge penalty.

MacKay et al. (2019) approximate the best-response function ``w*(λ)`` with a hypernetwork and
tune ``λ`` through it. On ridge regression the best response is known in closed form, so the
penalty it finds can be checked against the exact validation optimum.

Setup: a linear regression with 20 features, 30 noisy training and 200 validation examples
(Gaussian, generated from the seed), so that the penalty matters. The exact answer: the ridge
solution :math:`w^*(\\lambda) = (X^\\top X/n + \\lambda I)^{-1} X^\\top y/n` in closed form, its
validation MSE on a dense grid of :math:`\\log\\lambda` refined by golden-section search:
:math:`\\lambda^*`. ``hg.BestResponse``: a linear ``hg.nn.HyperNet`` generates the 20 weights
from :math:`\\log\\lambda` (``Positive(1.0, transform="exp")``), trained on the penalised
training loss at :math:`\\log\\tilde\\lambda \\sim N(\\log\\lambda, 0.5^2)`; after ``warmup``
steps, one Adam step on :math:`\\log\\lambda` through the hypernetwork per inner step. Full
batch, float64. The learned :math:`\\lambda` is the mean of :math:`\\log\\lambda` over the last
fifth of the schedule; the claim holds when it is within ``TOLERANCE_DECADES`` of
:math:`\\lambda^*`.

Time: ~2-5 s on a 2-core CPU at the default size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

import hypergrad as hg

from .common import Context, Outcome, Timer, plt, register

DT = torch.float64
TOLERANCE_DECADES = 0.1  # |log10 lambda - log10 lambda*| allowed


@dataclasses.dataclass
class Data:
    """Training inputs / targets ``x, y`` and validation inputs / targets ``xv, yv``."""

    x: Tensor
    y: Tensor
    xv: Tensor
    yv: Tensor


def make_data(seed: int, d: int = 20, n: int = 30, nv: int = 200) -> Data:
    """A noisy linear regression (noise 2.0) with ``d`` features, ``n`` training and ``nv``
    validation examples, generated from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, 1, generator=g, dtype=DT)
    x = torch.randn(n, d, generator=g, dtype=DT)
    xv = torch.randn(nv, d, generator=g, dtype=DT)
    noise = 2.0
    y = x @ w + noise * torch.randn(n, 1, generator=g, dtype=DT)
    yv = xv @ w + noise * torch.randn(nv, 1, generator=g, dtype=DT)
    return Data(x, y, xv, yv)


def ridge_val_loss(data: Data, log_lam: float) -> float:
    """Validation MSE of the exact minimiser of mean((Xw - y)^2) + lambda ||w||^2."""
    n, d = data.x.shape
    a = data.x.T @ data.x / n + math.exp(log_lam) * torch.eye(d, dtype=DT)
    w = torch.linalg.solve(a, data.x.T @ data.y / n)
    return float(((data.xv @ w - data.yv) ** 2).mean())


def optimal_log_lambda(data: Data) -> float:
    """argmin over log lambda in [-8, 4]: a grid, then golden-section search around its best."""
    grid = [-8 + 12 * i / 240 for i in range(241)]
    best = min(grid, key=lambda t: ridge_val_loss(data, t))
    lo, hi = best - 0.05, best + 0.05
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
        if ridge_val_loss(data, a) < ridge_val_loss(data, b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


@dataclasses.dataclass
class Result:
    """The exact and the learned penalty (natural logs), their validation MSEs, the penalty's
    schedule (``lambda`` after each hyperstep), the wall time and the inner step of each hyperstep
    of the schedule."""

    log_lambda_star: float
    log_lambda: float
    val_star: float
    val_learned: float
    seconds: float
    schedule: list[float] = dataclasses.field(default_factory=list)
    schedule_steps: list[int] = dataclasses.field(default_factory=list)

    @property
    def error_decades(self) -> float:
        """|log10 λ - log10 λ*|."""
        return abs(self.log_lambda - self.log_lambda_star) / math.log(10)


def best_response(
    seed: int = 0,
    warmup: int = 300,
    steps: int = 1500,
    lr: float = 3e-2,
    bar: Callable[[Iterable[int], str], Iterator[int]] | None = None,
) -> Result:
    """Train the best-response hypernetwork and the penalty (``warmup`` steps of the hypernetwork
    alone, then ``steps`` steps with a hyperstep each); return both penalties."""
    timer = Timer()
    data = make_data(seed)
    star = optimal_log_lambda(data)
    torch.manual_seed(seed)
    hp = hg.hparams.SelfTuned(
        lam=hg.hparams.Positive(1.0, transform="exp"), learn_scale=False, scale=0.5, dtype=DT
    )
    net = hg.nn.HyperNet(nn.Linear(data.x.shape[1], 1, bias=False).to(DT), hp.size)

    def val_loss(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return ((m(b[0], hparams=h) - b[1]) ** 2).mean()

    def train_loss(m: nn.Module, h: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        assert isinstance(m, hg.nn.HyperNet) and isinstance(h, hg.hparams.SelfTuned)
        w = m.weights(h)["weight"]  # the generated weights, for the penalty
        return val_loss(m, h, b) + h.draw(1)["lam"][0] * (w**2).sum()

    hopt = hg.BestResponse(
        net,
        hp,
        train_loss,
        val_loss,
        inner_optimizer=torch.optim.Adam(net.parameters(), lr=lr),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=lr),
        warmup=warmup,
    )
    train, val = (data.x, data.y), (data.xv, data.yv)
    it: Iterable[int] = range(warmup + steps)
    if bar is not None:
        it = bar(it, "best-response ridge")
    for _ in it:
        hopt.step(train)
        if hopt.hyper_due():
            hopt.hyper_step(val_batch=val)
    history = hp.history()
    # average the last fifth of the schedule (Adam's last steps oscillate around the optimum)
    rows = history[-max(1, steps // 5) :]
    learned = sum(math.log(r["lam"]) for r in rows) / len(rows)
    return Result(
        star,
        learned,
        ridge_val_loss(data, star),
        ridge_val_loss(data, learned),
        float(timer),
        [float(r["lam"]) for r in history],
        [int(r["inner_step"]) for r in history],
    )


@register(
    "stn_ridge",
    number=10,
    cpu_only=True,  # (its data and models live on the CPU, whatever --device says)
    title="best-response hypernetwork (hg.BestResponse) finds the validation-optimal ridge penalty",
    paper="MacKay et al. 2019 (Self-Tuning Networks)",
    claim="a best-response approximation tunes λ to the validation optimum without retraining "
    "(here: within 0.1 decades of the closed-form λ*)",
    defaults={"warmup": 300, "steps": 1500, "lr": 3e-2, "seed": 0},
    quick={"warmup": 50, "steps": 100},
    paper_size={"warmup": 1000, "steps": 5000},
)
def run(ctx: Context) -> Outcome:
    """The learned penalty against the closed-form validation optimum."""
    cfg = ctx.config

    def bar(it: Iterable[int], desc: str) -> Iterator[int]:
        return ctx.bar(it, desc=desc, total=cfg["warmup"] + cfg["steps"])

    r = best_response(cfg["seed"], cfg["warmup"], cfg["steps"], cfg["lr"], bar=bar)
    # each row at the inner step its hyperstep followed (the first: right after the warm-up's
    # last step), as the schedule records it
    for step, lam in zip(r.schedule_steps, r.schedule, strict=True):
        ctx.logger.log({"lambda": lam, "log10_lambda": math.log10(lam)}, step=step)
    ln10 = math.log(10)
    metrics = {
        "lambda_star": math.exp(r.log_lambda_star),
        "lambda": math.exp(r.log_lambda),
        "error_decades": r.error_decades,
        "val_mse_star": r.val_star,
        "val_mse": r.val_learned,
    }
    table = [
        {
            "penalty": "validation optimum (closed form)",
            "lambda": metrics["lambda_star"],
            "log10 lambda": r.log_lambda_star / ln10,
            "val MSE": r.val_star,
        },
        {
            "penalty": "best-response learned (from λ = 1)",
            "lambda": metrics["lambda"],
            "log10 lambda": r.log_lambda / ln10,
            "val MSE": r.val_learned,
        },
    ]
    pyplot = plt()
    fig, (a1, a2) = pyplot.subplots(1, 2, figsize=(11, 4))
    a1.plot(r.schedule_steps, r.schedule, label="λ (hg.BestResponse)")
    a1.axhline(metrics["lambda_star"], color="k", ls="--", label="λ* (closed form)")
    a1.set_yscale("log")
    a1.set_xlabel("inner step")
    a1.set_ylabel("ridge penalty λ")
    a1.legend()
    a1.grid(alpha=0.3, which="both")
    data = make_data(cfg["seed"])
    grid = [-6 + 8 * i / 160 for i in range(161)]
    a2.plot([math.exp(t) for t in grid], [ridge_val_loss(data, t) for t in grid], label="val MSE of w*(λ)")
    a2.axvline(metrics["lambda_star"], color="k", ls="--", label="λ*")
    a2.axvline(metrics["lambda"], color="C1", ls=":", label="learned λ")
    a2.set_xscale("log")
    a2.set_xlabel("λ")
    a2.legend()
    a2.grid(alpha=0.3)
    fig.suptitle(f"ridge, 20 features, 30 training examples (seed {cfg['seed']})")
    ctx.savefig(fig, "stn_ridge")
    verdict = "within" if r.error_decades <= TOLERANCE_DECADES else "NOT within"
    headline = (
        f"λ* {metrics['lambda_star']:.4f} vs learned {metrics['lambda']:.4f} from λ = 1: "
        f"{r.error_decades:.3f} decades ({verdict} {TOLERANCE_DECADES}); val MSE {r.val_learned:.4f} "
        f"vs the optimum's {r.val_star:.4f}"
    )
    return Outcome(metrics, table, headline)
