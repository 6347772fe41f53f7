"""What only a GPU can get wrong (every test here skips without CUDA; CI has none).

CUDA has kernels the CPU does not: memory-efficient / flash attention and the fused weight-norm
kernel have no (or a wrong) double backward, autocast picks other precisions, the allocator and
the RNG are per device. Each case computes on CUDA what a float64 CPU computation gives as ground
truth (the same model and batches, moved), with tolerances for float32 arithmetic (TF32 off), so
a kernel that differentiates twice wrongly, a replay on the wrong generator or a leak of held
snapshots fails here. Run on a GPU machine with ``benchmarks/gpu.sh tests`` (``-m gpu``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")
DT = torch.float64


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    """float32 means float32: TF32 matmuls / convolutions would round to 10 mantissa bits."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _flat(ts: Any) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to("cpu", DT) for t in ts])


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _mse(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()


def _penalised(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return _mse(m, h, b) + h.penalty(m)


class _Attention(nn.Module):
    """Self-attention through ``F.scaled_dot_product_attention`` (on CUDA in float32: the
    memory-efficient kernel, which has no double backward) and a linear read-out."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.head = nn.Linear(width, 1)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        return self.head(torch.tanh(self.out(y))).mean(dim=(1, 2))


class _WeightNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.utils.parametrizations.weight_norm(nn.Linear(6, 8))
        self.l2 = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def _sequence_batches(seed: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    return (
        (torch.randn(4, 12, 16, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT)),
        (torch.randn(3, 12, 16, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT)),
    )


def _vector_batches(seed: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    return (
        (torch.randn(16, 6, generator=g, dtype=DT), torch.randn(16, generator=g, dtype=DT)),
        (torch.randn(12, 6, generator=g, dtype=DT), torch.randn(12, generator=g, dtype=DT)),
    )


def _to(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    return tuple(t.to(device, dtype) for t in batch)


def _implicit_and_unrolled(
    build: Callable[[], nn.Module], batches: tuple[Any, Any], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact implicit hypergradient (``hg.Direct``) and Unrolled K = 2's, of a per-layer weight
    decay, on ``device`` in ``dtype`` (same initial weights everywhere: ``build`` is seeded)."""
    out = []
    for method in ("implicit", "unrolled"):
        model = build().to(device, dtype)
        hp = hg.hparams.WeightDecay(model, per="layer", init=0.05).to(device, dtype)
        tb, vb = (_to(b, device, dtype) for b in batches)
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        outer = torch.optim.SGD(hp.parameters(), lr=0.1)
        if method == "implicit":
            hopt: hg.HyperOptimizer = hg.Implicit(
                model, hp, _penalised, _mse, inner_optimizer=inner, outer_optimizer=outer, solver=hg.Direct()
            )
        else:
            hopt = hg.Unrolled(
                model, hp, _penalised, _mse, inner_optimizer=inner, outer_optimizer=outer, steps=2
            )
            for _ in range(2):
                hopt.step(tb)
        grads, info = hopt.hypergradient(train_batch=tb, val_batch=vb)
        assert not info.skipped
        out.append(_flat(grads))
    return out[0], out[1]


def _seeded(cls: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls()

    return build


@pytest.mark.parametrize(
    ("cls", "batches"),
    [(_Attention, _sequence_batches), (_WeightNormed, _vector_batches)],
    ids=["sdpa", "weight_norm"],
)
def test_fused_cuda_kernels_give_the_cpu_float64_hypergradient(cls: Any, batches: Any) -> None:
    # on CUDA, scaled_dot_product_attention in float32 takes the memory-efficient kernel (no
    # double backward) and weight_norm a fused kernel (a wrong one): the solvers must not use them
    data = batches(1)
    want_implicit, want_unrolled = _implicit_and_unrolled(_seeded(cls), data, torch.device("cpu"), DT)
    got_implicit, got_unrolled = _implicit_and_unrolled(_seeded(cls), data, CUDA, torch.float32)
    assert _rel(got_implicit, want_implicit) < 2e-3
    assert _rel(got_unrolled, want_unrolled) < 2e-3
    assert _rel(want_implicit, want_unrolled) > 1e-3  # two different quantities: neither is vacuous


def test_bf16_autocast_hypergradient_is_close_to_float32() -> None:
    def train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = _mse(m, h, b)
        return loss.float() + h.penalty(m)

    def val(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _mse(m, h, b).float()

    results = []
    for t, v in ((train, val), (_penalised, _mse)):
        model = _seeded(_Attention)().to(CUDA)
        hp = hg.hparams.WeightDecay(model, per="parameter", init=0.05).to(CUDA)
        tb, vb = (_to(b, CUDA, torch.float32) for b in _sequence_batches(2))
        hopt = hg.Implicit(
            model, hp, t, v,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=1e-3),
            solver=hg.Neumann(steps=5, alpha=0.1),
        )  # fmt: skip
        grads, info = hopt.hypergradient(train_batch=tb, val_batch=vb)
        assert not info.skipped
        results.append(_flat(grads))
    assert torch.isfinite(results[0]).all()
    assert _rel(results[0], results[1]) < 0.1  # bf16 keeps 8 bits: a few percent, not a wrong sign


def test_unrolled_replays_cuda_dropout_on_the_cuda_generator() -> None:
    # the replay must draw the same CUDA dropout masks as the real steps: the replayed weights
    # equal the real ones (the method checks this itself and warns when they differ)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1)).to(CUDA)
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-3).to(CUDA)
    hopt = hg.Unrolled(
        model, hp, _penalised, _mse,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=1e-2),
        steps=4,
    )  # fmt: skip
    tb, vb = (_to(b, CUDA, torch.float32) for b in _vector_batches(3))
    for _ in range(4):
        hopt.step(tb)
    real = [w.detach().clone() for w in model.parameters()]
    replayed = hopt.replayed_weights()
    for r, w in zip(real, replayed, strict=True):
        assert torch.allclose(r, w.detach(), rtol=1e-5, atol=1e-6)
    info = hopt.hyper_step(val_batch=vb)
    assert not info.skipped and all(torch.isfinite(p.grad).all() for p in hp.parameters())


def test_held_bytes_and_implicit_peak_on_the_cuda_allocator() -> None:
    # Unrolled holds at most two snapshots between hypersteps; Implicit's hyperstep peak does not
    # grow with the inner steps before it
    def run(method: str, inner_steps: int) -> tuple[int, int]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)).to(CUDA)
        hp = hg.hparams.WeightDecay(model, per="parameter", init=1e-4).to(CUDA)

        def ce(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
            return F.cross_entropy(m(b[0]), b[1])

        def train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
            return ce(m, h, b) + h.penalty(m)

        kw: dict[str, Any] = dict(
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=1e-3),
        )
        hopt: hg.HyperOptimizer = (
            hg.Unrolled(model, hp, train, ce, steps=5, **kw)
            if method == "unrolled"
            else hg.Implicit(model, hp, train, ce, solver=hg.Neumann(steps=5, alpha=0.05), **kw)
        )
        g = torch.Generator(device=CUDA).manual_seed(1)
        x = torch.randn(64, 256, device=CUDA, generator=g)
        batch = (x, torch.randint(0, 10, (64,), device=CUDA, generator=g))
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        for _ in range(inner_steps):
            hopt.step(batch)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        hopt.hyper_step(train_batch=batch, val_batch=batch)
        torch.cuda.synchronize()
        return held, torch.cuda.max_memory_allocated() - before

    # one snapshot = weights + momentum (float32); live anyway after a step: .grad and momentum
    weights = 256 * 512 + 512 + 512 * 10 + 10
    snapshot = 2 * 4 * weights
    held, _ = run("unrolled", 5)
    batches = 10 * 64 * (256 * 4 + 8)
    assert held <= 3 * snapshot + batches + (1 << 20), f"held {held} bytes, snapshot {snapshot}"
    _, peak_1 = run("implicit", 1)
    _, peak_20 = run("implicit", 20)
    assert peak_20 <= peak_1 * 1.05 + (1 << 20)


def test_nonfinite_step_on_cuda_changes_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)).to(CUDA)
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2).to(CUDA)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hopt = hg.Implicit(
        model, hp, _penalised, _mse,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        on_nonfinite="skip",
    )  # fmt: skip
    tb, _ = (_to(b, CUDA, torch.float32) for b in _vector_batches(4))
    hopt.step(tb)
    before = copy.deepcopy((model.state_dict(), opt.state_dict(), hp.state_dict()))
    bad = (tb[0].clone(), tb[1].clone())
    bad[0][3, 2] = float("nan")
    with pytest.warns(hg.NonFiniteWarning):
        hopt.step(bad)
    after = (model.state_dict(), opt.state_dict(), hp.state_dict())
    for a, b in zip(before[::2], after[::2], strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert before[1]["state"][0]["step"] == after[1]["state"][0]["step"]


def test_best_response_global_prior_follows_a_checkpoint_mapped_to_the_cpu() -> None:
    """A BestResponse(sampling="global") checkpoint read with ``map_location="cpu"`` kept its
    prior on the CPU after loading into a CUDA run, and the first global draw mixed devices
    (``mean + std * eps``). The loaded prior now follows the hyperparameters' device and dtype."""

    def build() -> hg.BestResponse:
        torch.manual_seed(0)
        hp = hg.hparams.SelfTuned(decay=hg.hparams.Positive(0.01, transform="exp"), learn_scale=False)
        hp = hp.to(CUDA)
        net = hg.nn.HyperNet(nn.Sequential(nn.Linear(4, 3)).to(CUDA), hp.size)

        def val(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
            return F.cross_entropy(m(b[0], hparams=h), b[1])

        def train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
            w = m.weights(h)  # type: ignore[operator]
            return val(m, h, b) + h.draw(1)["decay"][0] * sum((t**2).sum() for t in w.values())  # type: ignore[operator]

        return hg.BestResponse(
            net, hp, train, val, sampling="global",
            inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        )  # fmt: skip

    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 4, generator=g).to(CUDA), torch.randint(0, 3, (8,), generator=g).to(CUDA))
    first = build()
    first.step(batch)
    on_cpu = copy.deepcopy(first.state_dict())
    on_cpu = torch.utils._pytree.tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, on_cpu)
    second = build()
    second.load_state_dict(on_cpu)
    prior = second.hparams._prior
    assert prior is not None and all(t.device.type == "cuda" for t in prior)
    second.step(batch)
    info = second.hyper_step(val_batch=batch)
    assert info.outer_loss == info.outer_loss  # (finite: ran on one device)


def test_an_unrolled_state_loaded_with_map_location_cuda_resumes_exactly() -> None:
    """``torch.load(path, map_location="cuda")`` moves every tensor of a saved state to the GPU,
    the generator states (``torch.ByteTensor``) with them, which ``torch.set_rng_state`` refuses.
    A run saved mid-window with dropout (each recorded step keeps its generator state) and
    loaded that way resumes as the uninterrupted run goes on."""
    import io

    def build() -> tuple[nn.Module, hg.Unrolled]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1)).to(CUDA, DT)
        hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2).to(CUDA, DT)

        def train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
            return F.mse_loss(m(b[0]), b[1]) + h.penalty(m)  # type: ignore[operator]

        def val(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
            return F.mse_loss(m(b[0]), b[1])

        hopt = hg.Unrolled(
            model, hp, train, val, steps=3,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        )  # fmt: skip
        return model, hopt

    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(8, 4, generator=g, dtype=DT).to(CUDA), torch.randn(8, 1, generator=g, dtype=DT).to(CUDA))
        for _ in range(4)
    ]
    model, hopt = build()
    hopt.step(data[0])
    hopt.step(data[1])
    buf = io.BytesIO()
    torch.save(hopt.state_dict(), buf)
    hopt.step(data[2])
    want = hopt.hypergradient(val_batch=data[3])[0]
    buf.seek(0)
    _, again = build()
    again.load_state_dict(torch.load(buf, map_location="cuda", weights_only=True))
    again.step(data[2])
    got = again.hypergradient(val_batch=data[3])[0]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
