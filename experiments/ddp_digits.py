"""Data-parallel hyperparameter learning: one weight decay per weight on digits, under torchrun.

Each rank trains a ``DistributedDataParallel`` copy of the same MLP on its own shard of every
batch; ``hg.Implicit`` averages what the hypergradient needs over the ranks (the validation
gradient once, each HVP once, the hypergradient once), so every rank computes the hypergradient of
the concatenated batches and ends with the same weights and decays. Rank 0 prints the result.

    torchrun --nproc_per_node=2 experiments/ddp_digits.py          # gloo on CPU, ~10 s
    torchrun --nproc_per_node=8 experiments/ddp_digits.py --device cuda   # nccl, one GPU per rank
    python experiments/ddp_digits.py                                # one process, same numbers

The single-process run prints the same losses (to rounding): that is the point. ``--steps 9``
or fewer trains without a hyperstep (one comes every 10 steps) and says so.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn

import hypergrad as hg


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64, help="global batch size (split over the ranks)")
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1:
        parser.error(f"--steps and --batch must be >= 1 (got --steps {args.steps}, --batch {args.batch})")

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else "cpu")
    torch.set_num_threads(1)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the {world} ranks")

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32, device=device)
    y = torch.tensor(y, device=device)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).to(device)
    train, val, test = perm[:1000], perm[1000:1300], perm[1300:]

    torch.manual_seed(0)  # the same initial weights on every rank
    module = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    model = nn.parallel.DistributedDataParallel(module) if distributed else module
    hp = hg.hparams.WeightDecay(module, per="parameter", init=1e-3)

    def val_loss(m: nn.Module, h: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    def train_loss(m: nn.Module, h: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        assert isinstance(h, hg.hparams.WeightDecay)
        return val_loss(m, h, b) + h.penalty(m)

    hopt = hg.Implicit(
        model,
        hp,
        train_loss,
        val_loss,
        inner_optimizer=torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        solver=hg.Neumann(steps=5),
    )
    g = torch.Generator().manual_seed(1)  # the same batches on every rank; each takes its shard
    share = args.batch // world

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pick = idx[torch.randint(len(idx), (args.batch,), generator=g).to(device)]
        mine = pick[rank * share : (rank + 1) * share]
        return x[mine], y[mine]

    info: hg.HyperStepInfo | None = None  # the last hyperstep's (one every 10 steps)
    for i in range(args.steps):
        tb = batch(train)
        hopt.step(tb)
        if i % 10 == 9:
            info = hopt.hyper_step(train_batch=tb, val_batch=batch(val))
    with torch.no_grad():
        test_loss = float(nn.functional.cross_entropy(module(x[test]), y[test]))
        test_acc = float((module(x[test]).argmax(1) == y[test]).float().mean())
    if rank == 0:
        decays = torch.cat([d.flatten() for d in hp.decays().values()])
        last = (
            f"last outer loss {info.outer_loss:.4f}, hypergradient norm {info.hypergrad_norm:.3e}"
            if info is not None
            else "no hyperstep yet (one every 10 steps)"
        )
        print(
            f"{world} rank(s): {last}; test loss {test_loss:.4f}, accuracy {test_acc:.2%}; "
            f"median decay {float(decays.median()):.2e}"
        )
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
