"""The benchmark models, at three sizes, and the problem every benchmark solves on them.

Each model has a ``head`` submodule (its last layer), so ``hessian_subset=lambda n:
n.startswith("head.")`` selects the last layer on every model.

Sizes (``tiny`` for the smoke test, ``small`` for CPU runs, ``full`` for a GPU):

* ``mlp``: 784-256-256-10 (269k weights) at ``small`` and ``full``, batch 128; ``tiny`` 784-32-10.
* ``cnn``: three conv3x3 + BatchNorm + ReLU blocks and a linear head on 3x32x32 (57k weights),
  batch 128 at ``full``, 32 at ``small``.
* ``resnet18``: the CIFAR ResNet-18 (3x3 stem, no max-pool, 4 stages of 2 basic blocks, widths
  w/2w/4w/8w): w = 64 (11.2M weights), batch 128 at ``full``; w = 16 (0.7M), batch 16 at
  ``small``.
* ``gpt``: a GPT-2-style decoder (pre-LayerNorm, GELU MLP, causal attention written out so that it
  has a double backward on every device, untied output head): 12 layers, width 768, 12 heads,
  vocabulary 8192, context 256 (98M weights), batch 8 at ``full``; 2 layers, width 128, vocabulary
  1024, context 64, batch 8 at ``small``.

Inputs are synthetic but of real shapes and never zeros: Gaussian images / features and uniform
random class labels and tokens, from a seeded generator.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

SIZES = ("tiny", "small", "full")
Batch = tuple[Tensor, Tensor]


class MLP(nn.Module):
    """Flatten, then ``784-hidden-...-10`` with ReLU."""

    def __init__(self, hidden: tuple[int, ...], classes: int = 10, inputs: int = 784) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = inputs
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class SmallCNN(nn.Module):
    """Three conv3x3 + BatchNorm + ReLU blocks (strides 1, 2, 2), global average pooling, linear."""

    def __init__(self, channels: tuple[int, int, int] = (32, 64, 64), classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout, stride in zip(channels, (1, 2, 2), strict=True):
            layers += [
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            ]
            cin = cout
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two conv3x3 + BatchNorm, identity or 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (He et al. 2016, CIFAR variant): 3x3 stem without max-pool, four
    stages of two basic blocks with widths ``w, 2w, 4w, 8w`` (strides 1, 2, 2, 2), global average
    pooling, linear head. ``width=64`` is the usual 11.2M-weight network."""

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        cin = width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, written with matmul + softmax (not
    ``scaled_dot_product_attention``, whose fused CUDA kernels have no double backward)."""

    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        mask = torch.ones(context, context, dtype=torch.bool).tril()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(c // self.heads))
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        return self.proj(y)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` with a 4x GELU MLP."""

    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, context)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT-2-style language model: token + position embeddings, ``layers`` pre-LN blocks, final
    LayerNorm, an untied linear ``head`` to the vocabulary. Input ``(B, T)`` token ids, output
    ``(B, T, vocab)`` logits."""

    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[TransformerBlock(width, heads, context) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        return self.head(self.ln(self.blocks(x)))


@dataclasses.dataclass(frozen=True)
class Spec:
    """A model at one size: how to build it and a batch for it."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    batch: int
    make_input: Callable[[int, torch.Generator], Batch]  # (batch size, generator) -> (x, y) on CPU


def _images(shape: tuple[int, ...], classes: int = 10) -> Callable[[int, torch.Generator], Batch]:
    def make(n: int, gen: torch.Generator) -> Batch:
        return torch.randn(n, *shape, generator=gen), torch.randint(0, classes, (n,), generator=gen)

    return make


def _tokens(vocab: int, context: int) -> Callable[[int, torch.Generator], Batch]:
    def make(n: int, gen: torch.Generator) -> Batch:
        seq = torch.randint(0, vocab, (n, context + 1), generator=gen)
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()  # next-token targets

    return make


def spec(name: str, size: str) -> Spec:
    """The model ``name`` at ``size`` (one of :data:`SIZES`)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    tiny, full = size == "tiny", size == "full"
    if name == "mlp":
        hidden = (32,) if tiny else (256, 256)
        return Spec(
            name,
            "MLP " + "-".join(map(str, (784, *hidden, 10))),
            lambda: MLP(hidden),
            8 if tiny else 128,
            _images((784,)),
        )
    if name == "cnn":
        ch = (4, 8, 8) if tiny else (32, 64, 64)
        return Spec(
            name,
            f"CNN 3x[conv3x3+BN+ReLU] {ch} + linear, 3x32x32",
            lambda: SmallCNN(ch),
            4 if tiny else 128 if full else 32,
            _images((3, 32, 32)),
        )
    if name == "resnet18":
        width, batch = (4, 4) if tiny else (64, 128) if full else (16, 16)
        return Spec(
            name,
            f"ResNet-18 (CIFAR, width {width}), 3x32x32",
            lambda: ResNet18(width),
            batch,
            _images((3, 32, 32)),
        )
    if name == "gpt":
        vocab, context, width, layers, heads, batch = (
            (64, 16, 32, 1, 2, 2)
            if tiny
            else (8192, 256, 768, 12, 12, 8)
            if full
            else (1024, 64, 128, 2, 4, 8)
        )
        return Spec(
            name,
            f"GPT {layers} layers, width {width}, {heads} heads, vocab {vocab}, context {context}",
            lambda: GPT(vocab, context, width, layers, heads),
            batch,
            _tokens(vocab, context),
        )
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


MODELS = ("mlp", "cnn", "resnet18", "gpt")

# The problem: cross-entropy (over classes, or over every next token), one weight decay per weight.
LR, MOMENTUM, OUTER_LR, WD_INIT = 0.05, 0.9, 1e-3, 1e-4


#: ``torch.autocast`` dtype for every loss of the suite (the plain step's, hypergrad's and the
#: peers'), or None for full precision; set by ``run.py --autocast``.
AUTOCAST: torch.dtype | None = None


def logits_loss(out: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of logits ``out`` against ``y`` (tokens: flattened), in float32."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))


def forward(model: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``model(x)``, under ``torch.autocast`` when :data:`AUTOCAST` is set."""
    if AUTOCAST is None:
        return model(x)
    with torch.autocast(x.device.type, dtype=AUTOCAST):
        return model(x)


def cross_entropy(model: nn.Module, batch: Batch) -> Tensor:
    """Mean cross-entropy of ``model(x)`` against ``y`` (classes, or tokens: logits flattened)."""
    x, y = batch
    return logits_loss(forward(model, x), y)


def train_loss(model: nn.Module, hp: hg.hparams.WeightDecay, batch: Batch) -> Tensor:
    """Training loss: cross-entropy plus ``hp.penalty(model)`` (one decay per weight)."""
    return cross_entropy(model, batch) + hp.penalty(model)


def val_loss(model: nn.Module, hp: hg.hparams.WeightDecay, batch: Batch) -> Tensor:
    """Validation loss: plain cross-entropy."""
    return cross_entropy(model, batch)


def head_only(name: str) -> bool:
    """``hessian_subset`` for the last layer only."""
    return name.startswith("head.")


@dataclasses.dataclass
class Problem:
    """One model with its hyperparameters, inner optimiser and batches, on one device."""

    spec: Spec
    model: nn.Module
    hp: hg.hparams.WeightDecay
    inner: torch.optim.Optimizer
    train_batches: list[Batch]  # distinct batches: Unrolled replays several
    val_batch: Batch
    device: torch.device

    @property
    def train_batch(self) -> Batch:
        return self.train_batches[0]

    @property
    def weights(self) -> list[Tensor]:
        return list(self.model.parameters())

    @property
    def hparams(self) -> list[Tensor]:
        return list(self.hp.parameters())

    def outer(self) -> torch.optim.Optimizer:
        """The outer optimiser: ``Adam(fused=True)`` over the hyperparameters."""
        return torch.optim.Adam(self.hp.parameters(), lr=OUTER_LR, fused=True)

    def inner_copy(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """A copy of the model and of the inner optimiser, state included (for methods that must not
        move the shared model's weights, or peers that train their own copy)."""
        model = copy.deepcopy(self.model)
        inner = type(self.inner)(model.parameters(), **self.inner.defaults)
        # load_state_dict keeps tensors that need no cast: deep-copy, or the momentum buffers alias
        inner.load_state_dict(copy.deepcopy(self.inner.state_dict()))
        return model, inner

    def implicit(self, solver: hg.LinearSolver, subset: Callable[[str], bool] | None = None) -> hg.Implicit:
        return hg.Implicit(
            self.model,
            self.hp,
            train_loss,
            val_loss,
            inner_optimizer=self.inner,
            outer_optimizer=self.outer(),
            solver=solver,
            hessian_subset=subset,
        )

    def unrolled(self, steps: int, checkpoint: bool = False) -> hg.Unrolled:
        """Unrolled on its own copy of the model and inner optimiser (its replay must lead to its
        own weights; several timed side by side must not move each other's); ``checkpoint``: one
        replayed step's graph at a time."""
        model, inner = self.inner_copy()
        return hg.Unrolled(
            model,
            self.hp,
            train_loss,
            val_loss,
            inner_optimizer=inner,
            outer_optimizer=self.outer(),
            steps=steps,
            mode="reverse",
            checkpoint=checkpoint,
        )

    def torch_step(self) -> None:
        """The plain PyTorch training step of the same loss. Its backward runs for the weights only
        (``inputs=``), as ``hopt.step`` does: a plain ``backward()`` would also differentiate the
        penalty w.r.t. the hyperparameters and accumulate into their ``.grad``, work (1-5% of the
        step on CPU) and memory that no training step needs, charged to the unit every ratio
        divides by."""
        self.inner.zero_grad(set_to_none=True)
        train_loss(self.model, self.hp, self.train_batch).backward(inputs=self.weights)
        self.inner.step()


def make_problem(
    name: str, size: str, device: torch.device, seed: int = 0, n_train: int = 5, batch: int | None = None
) -> Problem:
    """The problem on ``name`` at ``size``: SGD(lr 0.05, momentum 0.9) inside, weight decay per weight
    (init 1e-4), ``n_train`` training batches and one validation batch (of the size's batch size, or
    ``batch``)."""
    s = spec(name, size)
    if batch is not None:
        s = dataclasses.replace(s, batch=batch)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = s.build().to(device)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=WD_INIT).to(device)
    inner = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def batch() -> Batch:
        x, y = s.make_input(s.batch, gen)
        return x.to(device), y.to(device)

    train = [batch() for _ in range(n_train)]
    return Problem(s, model, hp, inner, train, batch(), device)
