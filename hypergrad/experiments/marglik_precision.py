"""Experiment 12: prior precision by marginal likelihood on digits, no validation set needed.

Immer et al. (2021, 2023) select and learn the prior precision (weight decay) of a network from
its linearised-Laplace marginal likelihood on the training data alone; the NTK lower bound on
blocks of M examples makes that affordable and still picks the exact evidence's precision.

Setup: scikit-learn's digits (8x8 images / 16), split once by the seed into ``n_train`` (500)
training, ``n_val`` (300) validation and the rest (997) test images; an MLP 64-``hidden``-10
(ReLU, float64) trained by Adam (lr ``lr``, batches of ``batch``) on the MAP objective
``mean CE + delta |theta|^2 / (2 N)``, from the same initialisation in every run.

* Part A, selection: for each global precision ``delta`` of ``grid``, train to the MAP, then the
  exact log evidence (``hg.log_evidence``, all training images) and the NTK bound at each M of
  ``subsets`` (``hg.log_evidence_bound`` over disjoint blocks of M: the stochastic bound's
  expectation), with validation and test accuracy. Claim: the bound's best precision lies within
  a factor ~3 of the exact evidence's.
* Part B, learning: ``hg.MarginalLikelihood`` on the training set alone (one global precision,
  or one per layer; the bound on the step's batch of M = 100, or on a random M = 250 of the
  training images; burn-in ``burn_in`` steps, then one Adam step (lr ``hyper_lr``) on the log
  precisions every 5 steps), against the grid's precision chosen on validation accuracy.

Time: ~1-4 min on a 2-core CPU at the default size (the M = 250 hypersteps dominate).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

from .common import Context, Outcome, plt, register

Split = dict[str, tuple[Tensor, Tensor]]
#: the part B runs: (precision per, bound's subset size)
LEARN_RUNS = (("global", 100), ("layer", 100), ("global", 250))


def floats(text: str) -> list[float]:
    """``"0.1,1,10"`` -> ``[0.1, 1.0, 10.0]``."""
    return [float(t) for t in text.split(",") if t.strip()]


def data(seed: int, n_train: int, n_val: int) -> Split:
    """Digits / 16 (float64), shuffled by ``seed``: ``{"train", "val", "test"}`` -> ``(x, y)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(digits.target), generator=g)
    x = torch.tensor(digits.data, dtype=torch.float64)[perm] / 16.0
    y = torch.tensor(digits.target)[perm]
    a, b = n_train, n_train + n_val
    return {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}


def make_model(seed: int, hidden: int) -> nn.Module:
    """MLP 64-hidden-10 (ReLU, float64), initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).double()


def batches(n: int, steps: int, seed: int, size: int) -> list[Tensor]:
    """``steps`` index batches of ``size``, epoch after epoch of random permutations."""
    g = torch.Generator().manual_seed(seed + 1000)
    out: list[Tensor] = []
    while len(out) < steps:
        out.extend(torch.randperm(n, generator=g).split(size))
    return out[:steps]


def accuracy(model: nn.Module, xy: tuple[Tensor, Tensor]) -> float:
    """Classification accuracy (a fraction)."""
    with torch.no_grad():
        return float((model(xy[0]).argmax(1) == xy[1]).double().mean())


def train_fixed(delta: float, d: Split, cfg: dict[str, Any]) -> nn.Module:
    """Train to the MAP at a fixed global prior precision ``delta``."""
    model = make_model(cfg["seed"], cfg["hidden"])
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    x, y = d["train"]
    for idx in batches(len(y), cfg["steps"], cfg["seed"], cfg["batch"]):
        opt.zero_grad()
        penalty = sum((p**2).sum() for p in model.parameters())
        loss = F.cross_entropy(model(x[idx]), y[idx]) + 0.5 * delta * penalty / len(y)
        loss.backward()
        opt.step()
    return model


def evidences(model: nn.Module, delta: float, d: Split, seed: int, subsets: list[int]) -> dict[str, float]:
    """The exact log evidence and the partition bound at each M of ``subsets``."""
    x, y = d["train"]
    prior = hg.hparams.PriorPrecision(model, init=delta).double()
    with torch.no_grad():
        out = {"exact": float(hg.log_evidence(model, x, y, prior))}
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 7))
        for m in subsets:  # the partition bound (the stochastic bound's expectation)
            b = hg.log_evidence_bound(model, x[perm], y[perm], prior, data_size=len(y), subset_size=m)
            out[f"M={m}"] = float(b)
    return out


def learn(
    ctx: Context, d: Split, cfg: dict[str, Any], per: str, subset: int
) -> tuple[nn.Module, list[list[float]], float]:
    """Train with learned precisions; the bound on the step's batch, or on a random ``subset`` of
    the training images when that is larger than a batch. Logs each hyperstep; returns the
    model, the precisions after each hyperstep and the mean hyperstep time (s)."""
    model = make_model(cfg["seed"], cfg["hidden"])
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per=per, init=1.0)}).double()
    x, y = d["train"]
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="classification",
        data_size=len(y),
        inner_optimizer=torch.optim.Adam(model.parameters(), lr=cfg["lr"]),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=cfg["hyper_lr"]),
        subset_size=subset,
        burn_in=cfg["burn_in"],
        every=5,
    )
    name = f"{per}, M={subset}"
    trace: list[list[float]] = []
    hyper_seconds = 0.0
    g = torch.Generator().manual_seed(cfg["seed"] + 2000)
    order = batches(len(y), cfg["steps"], cfg["seed"], cfg["batch"])
    for step, idx in enumerate(ctx.bar(order, desc=f"marginal likelihood ({name})"), start=1):
        hopt.step((x[idx], y[idx]))
        if hopt.hyper_step_due():
            if subset > len(idx):
                idx = torch.randperm(len(y), generator=g)[:subset]
            info = hopt.hyper_step(train_batch=(x[idx], y[idx]))
            hyper_seconds += info.seconds
            values = _value(hp["prior"])
            trace.append(values)
            row: dict[str, Any] = {"run": name, "neg_log_evidence_bound": info.outer_loss}
            row.update({f"precision.{j}": v for j, v in enumerate(values)})
            ctx.logger.log({**row, "hyperstep_seconds": info.seconds}, step=step)
    return model, trace, hyper_seconds / max(len(trace), 1)


def _value(module: nn.Module) -> list[float]:
    """A hyperparameter module's current value(s) as a list."""
    value = getattr(module, "value")  # noqa: B009 (a property of the hyperparameter classes)
    assert isinstance(value, Tensor)
    return [float(v) for v in value.reshape(-1)]


def _argmax(rows: list[dict[str, float]], key: str) -> dict[str, float]:
    """The row with the largest ``row[key]``."""
    return max(rows, key=lambda r: r[key])


@register(
    "marglik_precision",
    number=12,
    title="prior precision of an MLP on digits from the marginal likelihood (exact, NTK bound, learned)",
    paper="Immer et al. 2021 (Scalable marginal likelihood); Immer et al. 2023 (NTK bound)",
    claim="the bound on blocks of M examples selects the exact evidence's prior precision, and "
    "precisions learned on the training data alone match a validation-tuned weight decay",
    defaults={
        "n_train": 500,
        "n_val": 300,
        "hidden": 128,
        "steps": 1000,
        "lr": 3e-3,
        "batch": 100,
        "grid": "0.03,0.1,0.3,1,3,10,30,100",
        "subsets": "50,100,250",
        "burn_in": 100,
        "hyper_lr": 0.1,
        "plot": True,
        "seed": 0,
    },
    quick={"n_train": 150, "grid": "0.1,1,10", "steps": 60, "burn_in": 20},
    paper_size={"steps": 3000, "n_train": 1000, "n_val": 300, "hidden": 256},
)
def run(ctx: Context) -> Outcome:
    """Part A (the evidence and its bounds over a grid) and part B (learned precisions)."""
    cfg = ctx.config
    grid, subsets = floats(cfg["grid"]), [int(m) for m in floats(cfg["subsets"])]
    d = data(cfg["seed"], cfg["n_train"], cfg["n_val"])
    n = len(d["train"][1])
    keys = ["exact"] + [f"M={m}" for m in subsets]
    rows: list[dict[str, float]] = []
    for delta in ctx.bar(grid, desc="grid (MAP + evidences)"):
        model = train_fixed(delta, d, cfg)
        ev = evidences(model, delta, d, cfg["seed"], subsets)
        rows.append(
            {"delta": delta, **ev, "val": accuracy(model, d["val"]), "test": accuracy(model, d["test"])}
        )
    best = {k: _argmax(rows, k)["delta"] for k in keys}
    chosen = max(rows, key=lambda r: r["val"])
    metrics: dict[str, float] = {}
    for r in rows:
        for k in (*keys, "val", "test"):
            metrics[f"grid.{r['delta']:g}.{k}"] = r[k]
    metrics.update({f"best.{k}": v for k, v in best.items()})
    for m in subsets:
        hi, lo = max(best[f"M={m}"], best["exact"]), min(best[f"M={m}"], best["exact"])
        metrics[f"best.M={m}.factor"] = hi / lo
    metrics["chosen_on_val.delta"] = chosen["delta"]
    metrics["chosen_on_val.test_acc"] = chosen["test"]
    blank = {f"bound {k}" if k != "exact" else "log evidence": "-" for k in keys}
    table: list[dict[str, Any]] = [
        {
            "part": "A. log evidence and its bounds",
            "method": "MAP at a fixed global precision",
            "precision": f"{r['delta']:g}",
            **{f"bound {k}" if k != "exact" else "log evidence": r[k] for k in keys},
            "val acc": r["val"],
            "test acc": r["test"],
        }
        for r in rows
    ]
    table.append(
        {
            "part": "B. test accuracy",
            "method": "grid, best validation accuracy",
            "precision": f"{chosen['delta']:g}",
            **blank,
            "val acc": chosen["val"],
            "test acc": chosen["test"],
        }
    )
    traces: dict[str, list[list[float]]] = {}
    learned: dict[str, tuple[str, float]] = {}
    for per, subset in LEARN_RUNS:
        model, trace, seconds = learn(ctx, d, cfg, per, subset)
        name = f"{per}, M={subset}"
        traces[name] = trace
        final = trace[-1] if trace else []
        acc = accuracy(model, d["test"])
        text = ", ".join(f"{v:.3g}" for v in final) or "-"
        learned[name] = (text, acc)
        key = f"ml.{per}.M={subset}"
        metrics[f"{key}.test_acc"] = acc
        metrics[f"{key}.val_acc"] = accuracy(model, d["val"])
        metrics[f"{key}.hyperstep_ms"] = seconds * 1e3
        for j, v in enumerate(final):
            metrics[f"{key}.precision.{j}"] = v
        table.append(
            {
                "part": "B. test accuracy",
                "method": f"marginal likelihood, {name} (training data only)",
                "precision": text,
                **blank,
                "val acc": metrics[f"{key}.val_acc"],
                "test acc": acc,
            }
        )
    if cfg["plot"]:
        _plot(ctx, rows, keys, traces, n)
    ml = "; ".join(f"{k} ({v[0]}) {v[1]:.2%}" for k, v in learned.items())
    headline = (
        f"best precision: {', '.join(f'{k} {v:g}' for k, v in best.items())} (N = {n}); test acc: "
        f"validation grid (δ={chosen['delta']:g}) {chosen['test']:.2%} vs marginal likelihood {ml}"
    )
    return Outcome(metrics, table, headline)


def _plot(
    ctx: Context, rows: list[dict[str, float]], keys: list[str], traces: dict[str, list[list[float]]], n: int
) -> None:
    """Evidence and bounds against the precision; the learned precisions over hypersteps."""
    pyplot = plt()
    fig, (a1, a2) = pyplot.subplots(1, 2, figsize=(11, 4))
    for k in keys:
        a1.plot([r["delta"] for r in rows], [r[k] for r in rows], marker="o", label=k)
    a1.set_xscale("log")
    a1.set_xlabel("prior precision (global)")
    a1.set_ylabel("log evidence / bound (nats)")
    a1.set_title(f"exact linearised-Laplace evidence and NTK bounds (N = {n})")
    a1.legend()
    for per, tr in traces.items():
        for j in range(len(tr[0]) if tr else 0):
            label = per if len(tr[0]) == 1 else f"{per}: layer {j}"
            a2.plot([math.log10(t[j]) for t in tr], label=label)
    a2.set_xlabel("hyperstep")
    a2.set_ylabel("log10 prior precision")
    a2.set_title("learned precisions")
    a2.legend()
    fig.tight_layout()
    ctx.savefig(fig, "marglik_precision")
