"""A HyperOptimizer dropped into existing training scripts: the idioms of real scripts, checked
against references computed without hypergrad.

What is checked, and against what (all in float64):

* Implicit (``hg.Direct``) hypergradients, in scripts that combine containers in an
  ``nn.ModuleDict`` inside a custom module with a raw ``nn.Parameter`` and a buffer, freeze a
  backbone or add a head with ``add_param_group`` mid-run, use hooks, in-place operations on
  activations, ``torch.no_grad()`` / ``detach()`` parts and losses calling the model several
  times: against the implicit-function-theorem formula built here from a dense Hessian of the
  user's loss on the real model (``torch.autograd`` only).
* Unrolled hypergradients with a frozen backbone, with ``torch.utils.checkpoint`` inside the model,
  with weight decay both in the container and in the inner optimiser (SGD with momentum, AdamW):
  against central finite differences of the validation loss after re-running the same inner
  steps with plain ``torch.optim``.
* A hyperparameter frozen mid-run (``requires_grad_(False)``) is held constant and the others'
  hypergradient is unchanged.
* ``torch.save(hopt.state_dict())`` / ``torch.load(weights_only=True)`` into a fresh run built in
  another order (containers built before ``.to(float64)``; dict / namedtuple batches with masks,
  integer and string fields; Adam outer optimiser with a scheduler and
  ``zero_grad(set_to_none=False)``): bit-exact against the straight run; likewise a deepcopy.
* Implicit with the inner SGD's own ``weight_decay`` on one group: against the dense formula with
  that decay added to the training loss. An input-gradient penalty (``torch.autograd.grad``
  inside the loss) with two dropout passes: Unrolled against finite differences under the same
  seeds, Implicit against the dense formula.
* The divergence guard after a first training loss of exactly 0 (then a real spike is still
  caught); a WeightDecay built while a backbone was frozen warns once when the backbone trains.
* Clear errors: a loss of shape ``(1,)`` or a Python float, a validation batch of another dtype,
  Unrolled before any step, a model converted after the HyperOptimizer was built, a checkpoint
  loaded into optimisers that list the same parameters in another order (nothing loaded).
"""

from __future__ import annotations

import collections
import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import hypergrad as hg
from hypergrad.testing import dense_ift_hypergradient

DT = torch.float64


def _data(seed: int, n: int = 24) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, 1, generator=g, dtype=DT)


TB, VB = _data(0), _data(1)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def _mse(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


def _penalised(m: nn.Module, h: nn.Module, b: Any) -> Tensor:
    return _mse(m, h, b) + h.penalty(m)


_ift = dense_ift_hypergradient  # the dense IFT reference


def _flat(ts: Any) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _close_to(got: Any, ref: list[Tensor], rtol: float, atol: float) -> None:
    torch.testing.assert_close(_flat(got), _flat(ref), rtol=rtol, atol=atol)


def _implicit(model: nn.Module, hp: nn.Module, tl: Any, vl: Any = _mse, lr: float = 0.1) -> hg.Implicit:
    return hg.Implicit(
        model,
        hp,
        tl,
        vl,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.01),
        solver=hg.Direct(),
    )


# ----------------------------------------------------------------------------- Implicit vs IFT


class _Hparams(nn.Module):
    """Two containers in an nn.ModuleDict, a raw parameter and a buffer, as a script writes them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.c = nn.ModuleDict(
            {"wd": hg.hparams.WeightDecay(model, per="layer", init=0.1), "s": hg.hparams.Hparam(0.5)}
        )
        self.t = nn.Parameter(torch.tensor(0.3))
        self.register_buffer("calls", torch.zeros(()))


def test_containers_in_a_module_dict_with_a_raw_parameter_match_the_dense_ift() -> None:
    model = _mlp()
    hp = _Hparams(model).to(DT)  # containers built while the model was already float64

    def tl(m: nn.Module, h: Any, b: Any) -> Tensor:
        h.calls += 1
        return _mse(m, h, b) * h.c["s"]() + h.c["wd"].penalty(m) + h.t * m[2].bias.square().sum()

    def vl(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _mse(m, h, b) + 0.1 * h.t**2

    hopt = _implicit(model, hp, tl, vl)
    for _ in range(4):
        hopt.step(TB)
    calls = float(hp.calls)
    grads, info = hopt.hypergradient(train_batch=TB, val_batch=VB)
    assert float(hp.calls) == calls == 4.0  # the hyperparameters' buffer moves with real steps only
    ref = _ift(model, hp, tl, vl, TB, VB)
    _close_to(grads, ref, rtol=1e-9, atol=1e-12)
    assert info.hypergrad_norm == pytest.approx(float(_flat(ref).norm()), rel=1e-9)
    hp.zero_grad(set_to_none=False)
    hopt.hyper_step(train_batch=TB, val_batch=VB)
    _close_to([p.grad for p in hp.parameters()], ref, rtol=1e-9, atol=1e-12)


def test_backbone_frozen_and_head_added_mid_run_match_the_dense_ift() -> None:
    backbone = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).to(DT)
    head = nn.Linear(4, 1).to(DT)
    model = nn.Sequential(backbone, head)
    hp = nn.ModuleDict(
        {"wd": hg.hparams.WeightDecay(backbone, per="layer", init=0.1), "s": hg.hparams.Hparam(0.5, dtype=DT)}
    )

    def tl(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _mse(m, h, b) + h["wd"].penalty(m[0]) + h["s"]() * m[1].weight.square().sum()

    head.requires_grad_(False)
    inner = torch.optim.SGD(backbone.parameters(), lr=0.1)
    hopt = hg.Implicit(
        model,
        hp,
        tl,
        _mse,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.01),
        solver=hg.Direct(),
    )
    for _ in range(2):
        hopt.step(TB)
    head.requires_grad_(True)
    inner.add_param_group({"params": head.parameters(), "lr": 0.05})
    for _ in range(2):
        hopt.step(TB)
    grads, _ = hopt.hypergradient(train_batch=TB, val_batch=VB)
    _close_to(grads, _ift(model, hp, tl, _mse, TB, VB), rtol=1e-9, atol=1e-12)
    # now the backbone is frozen: its decay no longer reaches anything, and the warning says why
    backbone.requires_grad_(False)
    hopt.step(TB)
    with pytest.warns(hg.DisconnectedWarning, match="requires_grad_"):
        grads, _ = hopt.hypergradient(train_batch=TB, val_batch=VB)
    ref = _ift(model, hp, tl, _mse, TB, VB)
    _close_to(grads, ref, rtol=1e-9, atol=1e-12)
    assert float(grads[0].abs()) == 0.0 and float(ref[1].abs()) > 1e-4


class _Hooked(nn.Module):
    """Forward pre/post hooks, a full backward hook, in-place ops on activations."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1)
        self.a.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
        self.a.register_forward_hook(lambda m, args, out: out * 1.5)
        self.b.register_full_backward_hook(lambda m, gi, go: None)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        h.mul_(0.5)
        h = nn.functional.softplus(h) + 0
        h[:, 0] = 0.0
        return self.b(h)


def test_hooks_in_place_ops_and_no_grad_parts_match_the_dense_ift() -> None:
    model = _Hooked().to(DT)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=0.1)

    def tl(m: nn.Module, h: Any, b: Any) -> Tensor:  # consistency regularisation
        x, y = b
        with torch.no_grad():
            target = m(x)
        consistency = ((m(x + 0.1) - target) ** 2).mean() + ((m(0.5 * x) - m(x).detach()) ** 2).mean()
        return _mse(m, h, b) + consistency + h.penalty(m)

    hopt = _implicit(model, hp, tl)
    for _ in range(3):
        hopt.step(TB)
    grads, _ = hopt.hypergradient(train_batch=TB, val_batch=VB)
    _close_to(grads, _ift(model, hp, tl, _mse, TB, VB), rtol=1e-8, atol=1e-12)


# ----------------------------------------------------------------------------- Unrolled vs FD


def _fd_unrolled(
    model: nn.Module,
    hp: nn.Module,
    tl: Any,
    start: dict[str, Tensor],
    opt_state: dict[str, Any],
    make_opt: Callable[[nn.Module], torch.optim.Optimizer],
    steps: int,
    eps: float = 1e-6,
) -> list[Tensor]:
    """Central differences of L_V after ``steps`` plain torch.optim steps from ``start``."""
    raws = [p.detach().clone() for p in hp.parameters()]

    def objective(values: list[Tensor]) -> float:
        m, h = copy.deepcopy(model), copy.deepcopy(hp)
        with torch.no_grad():
            for p, v in zip(h.parameters(), values, strict=True):
                p.copy_(v)
            for n, p in m.named_parameters():
                p.copy_(start[n])
        opt = make_opt(m)
        opt.load_state_dict(copy.deepcopy(opt_state))
        for _ in range(steps):
            opt.zero_grad()
            tl(m, h, TB).backward()
            opt.step()
        with torch.no_grad():
            return float(_mse(m, h, VB))

    out = []
    for j, r in enumerate(raws):
        fd = torch.zeros_like(r)
        for i in range(r.numel()):
            up, down = [x.clone() for x in raws], [x.clone() for x in raws]
            up[j].view(-1)[i] += eps
            down[j].view(-1)[i] -= eps
            fd.view(-1)[i] = (objective(up) - objective(down)) / (2 * eps)
        out.append(fd)
    return out


def _unrolled_fd_case(
    model: nn.Module, make_opt: Callable[[nn.Module], torch.optim.Optimizer], freeze: bool = False
) -> tuple[Any, list[Tensor]]:
    hp = hg.hparams.WeightDecay(model, per="layer" if freeze else "parameter", init=0.1)
    inner = make_opt(model)
    hopt = hg.Unrolled(
        model,
        hp,
        _penalised,
        _mse,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.01),
        steps=3,
    )
    for _ in range(2):
        hopt.step(TB)
    hopt.hyper_step(train_batch=TB, val_batch=VB)
    if freeze:
        model[0].requires_grad_(False)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt_state = copy.deepcopy(inner.state_dict())
    for _ in range(3):
        hopt.step(TB)
    if freeze:
        with pytest.warns(hg.DisconnectedWarning):
            grads, _ = hopt.hypergradient(train_batch=TB, val_batch=VB)
    else:
        grads, _ = hopt.hypergradient(train_batch=TB, val_batch=VB)
    fd = _fd_unrolled(model, hp, _penalised, start, opt_state, make_opt, steps=3)
    return grads, fd


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5, weight_decay=0.05),
        lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1),
    ],
    ids=["sgd-momentum-weight_decay", "adamw"],
)
def test_unrolled_with_decay_in_container_and_optimizer_matches_fd(make_opt: Any) -> None:
    grads, fd = _unrolled_fd_case(_mlp(), make_opt)
    assert float(_flat(fd).abs().max()) > 1e-4
    _close_to(grads, fd, rtol=1e-5, atol=1e-8)


def test_unrolled_with_a_backbone_frozen_mid_run_matches_fd() -> None:
    grads, fd = _unrolled_fd_case(_mlp(), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), freeze=True)
    assert float(grads[0].abs().max()) == 0.0 and float(_flat(fd).abs().max()) > 1e-4
    _close_to(grads, fd, rtol=1e-5, atol=1e-8)


class _Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.utils.checkpoint.checkpoint(lambda z: torch.tanh(self.a(z)), x, use_reentrant=False)
        return self.b(h)


@pytest.mark.parametrize("replay_checkpoint", [False, True])
def test_checkpointed_model_replays_the_real_steps_and_matches_fd(replay_checkpoint: bool) -> None:
    # Before the fix the backward pass recomputed the checkpointed block with the real (current)
    # weights instead of the replayed ones: a ReplayWarning, and a hypergradient of other steps.
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    model = _Checkpointed().to(DT)
    with torch.no_grad():
        for p, q in zip(plain.parameters(), model.parameters(), strict=True):
            p.copy_(q)
    generator = torch.utils.checkpoint._checkpoint_without_reentrant_generator
    out = []
    for m in (model, plain):
        hp = hg.hparams.WeightDecay(m, per="parameter", init=0.1)
        hopt = hg.Unrolled(
            m,
            hp,
            _penalised,
            _mse,
            inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.01),
            steps=3,
            checkpoint=replay_checkpoint,
        )
        start = {n: p.detach().clone() for n, p in m.named_parameters()}
        opt_state = copy.deepcopy(hopt.inner_optimizer.state_dict())
        for _ in range(3):
            hopt.step(TB)
        grads, _ = hopt.hypergradient(train_batch=TB, val_batch=VB)
        out.append(grads)
    fd = _fd_unrolled(
        plain, hp, _penalised, start, opt_state, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), 3
    )
    # torch's own checkpointing is back outside the hypergradient (real steps still recompute)
    assert torch.utils.checkpoint._checkpoint_without_reentrant_generator is generator
    _close_to(out[0], out[1], rtol=1e-12, atol=1e-15)
    _close_to(out[0], fd, rtol=1e-5, atol=1e-8)
    # Implicit through the same model still matches the dense formula
    hp = hg.hparams.WeightDecay(model, per="parameter", init=0.1)
    hopt_i = _implicit(model, hp, _penalised)
    hopt_i.step(TB)
    grads, _ = hopt_i.hypergradient(train_batch=TB, val_batch=VB)
    _close_to(grads, _ift(model, hp, _penalised, _mse, TB, VB), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- frozen hyperparameter


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_a_hyperparameter_frozen_mid_run_is_held_and_the_others_are_unchanged(method: str) -> None:
    # Before the fix: RuntimeError "One of the differentiated Tensors does not require grad"
    # from deep inside autograd.
    model = _mlp()
    hp = nn.ModuleDict(
        {"wd": hg.hparams.WeightDecay(model, "layer", 0.05), "s": hg.hparams.Hparam(0.5, dtype=DT)}
    )

    def tl(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _mse(m, h, b) * h["s"]() + h["wd"].penalty(m)

    kw: dict[str, Any] = {"solver": hg.Direct()} if method == "implicit" else {"steps": 2}
    cls = hg.Implicit if method == "implicit" else hg.Unrolled
    outer = torch.optim.Adam(hp.parameters(), lr=0.01)
    hopt = cls(
        model,
        hp,
        tl,
        _mse,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=outer,
        **kw,
    )
    for _ in range(2):
        hopt.step(TB)
    hopt.hyper_step(train_batch=TB, val_batch=VB)  # Adam now has state for "s"
    for _ in range(2):
        hopt.step(TB)
    free, _ = hopt.hypergradient(train_batch=TB, val_batch=VB)
    hp["s"].requires_grad_(False)
    held, info = hopt.hypergradient(train_batch=TB, val_batch=VB)
    for g, f, p in zip(held, free, hp.parameters(), strict=True):
        if p is hp["s"].raw:
            assert float(g.abs().max()) == 0.0 and float(f.abs().max()) > 1e-6
        else:
            torch.testing.assert_close(g, f, rtol=1e-12, atol=0.0)
    s0, wd0 = hp["s"].raw.detach().clone(), [p.detach().clone() for p in hp["wd"].parameters()]
    hopt.hyper_step(train_batch=TB, val_batch=VB)
    assert hp["s"].raw.grad is None and torch.equal(hp["s"].raw, s0) and not hp["s"].raw.requires_grad
    assert all(not torch.equal(p, q) for p, q in zip(hp["wd"].parameters(), wd0, strict=True))
    hp["s"].requires_grad_(True)
    hopt.hyper_step(train_batch=TB, val_batch=VB)
    assert not torch.equal(hp["s"].raw, s0)


# ----------------------------------------------------------------------------- state across runs

VBatch = collections.namedtuple("VBatch", "x y index")


def _train_batch(i: int) -> dict[str, Any]:
    x, y = _data(10 + i)
    mask = (torch.arange(len(x)) % 3 != 0).to(DT)
    return {"x": x, "y": y, "mask": mask, "length": torch.tensor(len(x)), "name": f"b{i}"}


def _val_batch(i: int) -> VBatch:
    x, y = _data(100 + i)
    return VBatch(x, y, torch.arange(len(x)))


class _BufferedHparams(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.wd = hg.hparams.WeightDecay(model, per="global", init=0.1)
        self.s = hg.hparams.Hparam(0.5)
        self.extra = nn.Parameter(torch.zeros(4))
        self.register_buffer("count", torch.zeros(()))


def _script_run(method: str, hparams_first: bool) -> tuple[Any, Any, Any, Any]:
    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))  # float32 at first
    if hparams_first:  # containers built before the model is moved to float64
        hp = _BufferedHparams(model)
        model, hp = model.to(DT), hp.to(DT)
    else:
        model = model.to(DT)
        hp = _BufferedHparams(model).to(DT)

    def tl(m: nn.Module, h: Any, b: dict[str, Any]) -> Tensor:
        h.count += 1
        per_example = ((m(b["x"]) - b["y"]) ** 2).squeeze(-1) * b["mask"]
        return per_example.sum() / b["length"] * h.s() + h.wd.penalty(m) + (h.extra * m[0].bias).sum()

    def vl(m: nn.Module, h: Any, b: VBatch) -> Tensor:
        return ((m(b.x) - b.y) ** 2).mean()

    outer = torch.optim.Adam(hp.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(outer, 2, 0.5)
    inner = torch.optim.Adam(model.parameters(), lr=0.02)
    if method == "implicit":
        hopt: Any = hg.Implicit(
            model, hp, tl, vl, inner_optimizer=inner, outer_optimizer=outer, solver=hg.Neumann(steps=3)
        )
    else:
        hopt = hg.Unrolled(model, hp, tl, vl, inner_optimizer=inner, outer_optimizer=outer, steps=3)
    return model, hp, hopt, sched


def _loop(hopt: Any, sched: Any, batches: range) -> None:
    for i in batches:
        hopt.step(_train_batch(i))
        if i % 2 == 1:
            hopt.outer_optimizer.zero_grad(set_to_none=False)
            hopt.hyper_step(train_batch=_train_batch(i), val_batch=_val_batch(i))
            sched.step()


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_saved_state_resumes_bit_exactly_in_a_run_built_in_another_order(method: str) -> None:
    model, hp, hopt, sched = _script_run(method, hparams_first=True)
    _loop(hopt, sched, range(4))
    buf = io.BytesIO()
    torch.save({"hopt": hopt.state_dict(), "sched": sched.state_dict()}, buf)
    snapshot = copy.deepcopy(model)  # (a deepcopy of a leaf-only model: no graph is left in it)
    assert _same(snapshot, model) and all(p.is_leaf and p.grad_fn is None for p in snapshot.parameters())
    copied = copy.deepcopy(hopt)  # a deepcopy after a hyperstep goes on like the original too
    copied_sched = torch.optim.lr_scheduler.StepLR(copied.outer_optimizer, 2, 0.5)
    copied_sched.load_state_dict(sched.state_dict())
    _loop(hopt, sched, range(4, 8))
    assert hp.wd.raw[0].dtype == DT and float(hp.count) == 8.0

    model2, hp2, hopt2, sched2 = _script_run(method, hparams_first=False)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    hopt2.load_state_dict(state["hopt"])
    sched2.load_state_dict(state["sched"])
    _loop(hopt2, sched2, range(4, 8))
    _loop(copied, copied_sched, range(4, 8))
    for other_model, other_hp in ((model2, hp2), (copied.model, copied.hparams)):
        assert _same(model, other_model) and _same(hp, other_hp)
    assert hopt2.hyper_steps == hopt.hyper_steps == 4


# ----------------------------------------------------------------------------- errors


def test_unusable_losses_and_batches_are_named() -> None:
    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="global", init=0.1)

    def two_elements(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _penalised(m, h, b).expand(2)

    with pytest.raises(ValueError, match=r"scalar Tensor; two_elements returned \(2,\)"):
        _implicit(model, hp, two_elements).step(TB)
    # (a one-element loss of shape (1,) is the scalar, as for backward(): tests/test_round20_core.py)

    def float32_loss(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _penalised(m, h, b).float()

    def python_float(m: nn.Module, h: Any, b: Any) -> Any:
        return float(_penalised(m, h, b).detach())

    with pytest.raises(ValueError, match=r"scalar Tensor; python_float returned float"):
        _implicit(model, hp, python_float).step(TB)

    hopt = _implicit(model, hp, float32_loss)
    before = [p.detach().clone() for p in model.parameters()]
    assert hopt.step(TB).dtype == torch.float32
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    # a hyperstep before any step is fine for Implicit (at the current weights) ...
    info = _implicit(_mlp(), hg.hparams.WeightDecay(_mlp(), "global", 0.1), _penalised).hyper_step(
        train_batch=TB, val_batch=VB
    )
    assert info.hyper_steps == 1 and info.outer_loss > 0
    with pytest.raises(ValueError, match=r"val_batch holds a torch.float32 tensor.*\.to\(torch.float64\)"):
        hopt.hyper_step(train_batch=TB, val_batch=(VB[0].float(), VB[1].float()))
    # ... and a named error for Unrolled
    m = _mlp()
    h = hg.hparams.WeightDecay(m, "global", 0.1)
    unrolled = hg.Unrolled(
        m,
        h,
        _penalised,
        _mse,
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(h.parameters(), lr=0.1),
    )
    with pytest.raises(ValueError, match="at least one inner step"):
        unrolled.hyper_step(train_batch=TB, val_batch=VB)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_divergence_guard_after_a_zero_first_loss_waits_for_a_nonzero_one(method: str) -> None:
    # Before the fix a first accepted loss of exactly 0 (a hinge loss already satisfied, a loss
    # weight warmed up from 0) became the scale: every later step was refused as diverged.
    model = _mlp()
    hp = hg.hparams.Hparam(0.5, dtype=DT)
    warmup = [0.0, 1.0, 1.0, 50.0]

    def tl(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _mse(m, h, b) * h() * b[2]

    def vl(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _mse(m, h, b) * h()

    kw: dict[str, Any] = {"solver": hg.Neumann(steps=3)} if method == "implicit" else {"steps": 2}
    cls = hg.Implicit if method == "implicit" else hg.Unrolled
    hopt = cls(
        model,
        hp,
        tl,
        vl,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.01),
        divergence=10,
        **kw,
    )
    losses = []
    for i, scale in enumerate(warmup[:3]):
        before = [p.detach().clone() for p in model.parameters()]
        losses.append(float(hopt.step((*TB, torch.tensor(scale, dtype=DT)))))
        moved = any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
        assert moved == (i > 0)  # a zero loss has a zero gradient: accepted, nothing moves
    assert losses[0] == 0.0 and losses[1] > 0 and hopt.inner_steps == 3
    hopt.hyper_step(train_batch=(*TB, torch.tensor(1.0, dtype=DT)), val_batch=VB)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        hg.NonFiniteError, match=r"exceeds divergence=10 times the first accepted nonzero one"
    ):
        hopt.step((*TB, torch.tensor(warmup[3], dtype=DT)))  # 50x the scale of step 1: still caught
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def _gradient_penalty(m: nn.Module, h: Any, b: Any) -> Tensor:
    """Input-gradient penalty (a torch.autograd.grad inside the loss) plus consistency between
    two dropout passes: the hypergradient differentiates through both."""
    x = b[0].clone().requires_grad_(True)
    out = m(x)
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return ((out - b[1]) ** 2).mean() + h() * ((gx**2).sum(1).mean() + ((m(b[0]) - out) ** 2).mean())


def _eval_mse(m: nn.Module, h: Any, b: Any) -> Tensor:
    m.eval()  # the validation loss toggles the mode itself, as evaluation code does
    try:
        return _mse(m, h, b)
    finally:
        m.train()


def test_gradient_penalty_and_dropout_consistency_match_references() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 1)).to(DT)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    hp = hg.hparams.Hparam(0.3, dtype=DT)
    hopt = hg.Unrolled(
        model,
        hp,
        _gradient_penalty,
        _eval_mse,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        steps=3,
    )
    torch.manual_seed(5)
    for _ in range(3):
        hopt.step(TB)
    (grad,), _ = hopt.hypergradient(train_batch=TB, val_batch=VB)

    def objective(raw: float) -> float:
        m, h = copy.deepcopy(model), copy.deepcopy(hp)
        with torch.no_grad():
            h.raw.fill_(raw)
            for n, p in m.named_parameters():
                p.copy_(start[n])
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(5)
        for _ in range(3):
            opt.zero_grad()
            _gradient_penalty(m, h, TB).backward()
            opt.step()
        with torch.no_grad():
            return float(_eval_mse(m, h, VB))

    r = float(hp.raw.detach())
    fd = (objective(r + 1e-6) - objective(r - 1e-6)) / 2e-6
    assert abs(fd) > 1e-3
    assert float(grad) == pytest.approx(fd, rel=1e-5)
    # Implicit, in eval mode (no dropout), against the dense formula
    model.eval()
    implicit = _implicit(model, hp, _gradient_penalty)
    implicit.step(TB)
    grads, _ = implicit.hypergradient(train_batch=TB, val_batch=VB)
    _close_to(grads, _ift(model, hp, _gradient_penalty, _mse, TB, VB), rtol=1e-8, atol=1e-12)


def test_model_converted_after_construction_is_named_not_blamed_on_the_batch() -> None:
    # Before the fix: "batch holds a torch.float64 tensor, but the model's parameters are
    # torch.float32; convert the batch with .to(torch.float32)" (they were float64 by then).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    hp = hg.hparams.WeightDecay(model, "global", 0.1)
    hopt = _implicit(model, hp, _penalised)
    model.to(DT)
    hp.to(DT)
    for call in (lambda: hopt.step(TB), lambda: hopt.hyper_step(train_batch=TB, val_batch=VB)):
        with pytest.raises(ValueError, match=r"now torch.float64 on cpu, but were torch.float32 .* first"):
            call()


def test_weight_decay_built_on_a_frozen_backbone_warns_once_when_it_is_unfrozen() -> None:
    # Before: a backbone frozen for linear probing when the container was built was silently
    # never penalised once fine-tuning unfroze it.
    model = _mlp()
    model[0].requires_grad_(False)
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.1)
    on_purpose = hg.hparams.WeightDecay(model, per="layer", init=0.1, include=lambda n: n.startswith("2."))
    hopt = _implicit(model, hp, _penalised)
    hopt.step(TB)
    model[0].requires_grad_(True)  # fine-tuning: the backbone trains from now on
    with pytest.warns(UserWarning, match=r"\['0.weight', '0.bias'\] were frozen .* train now"):
        hopt.step(TB)
    hopt.step(TB)  # once
    on_purpose.penalty(model)  # left out with include=...: no warning
    decays = hp.decays()
    value = float(hp.penalty(model).detach())
    expected = 0.5 * sum(
        float(decays[n]) * float(p.detach().square().sum())
        for n, p in model.named_parameters()
        if n in decays
    )
    assert set(decays) == {"2.weight", "2.bias"} and value == pytest.approx(expected, rel=1e-12)


def test_implicit_with_decay_in_container_and_in_one_sgd_group_matches_the_dense_ift() -> None:
    """The inner SGD's own weight_decay (on one group) moves the optimum the IFT differentiates:
    the reference adds it to the training loss as 0.05/2 ||w||^2 on that group's weights."""
    model = _mlp()
    hp = hg.hparams.WeightDecay(model, "layer", 0.1)
    inner = torch.optim.SGD(
        [{"params": model[0].parameters(), "weight_decay": 0.05}, {"params": model[2].parameters()}],
        lr=0.1,
        momentum=0.9,
    )
    hopt = hg.Implicit(
        model,
        hp,
        _penalised,
        _mse,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.Direct(),
    )
    for _ in range(3):
        hopt.step(TB)
    grads, _ = hopt.hypergradient(train_batch=TB, val_batch=VB)

    def with_sgd_decay(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _penalised(m, h, b) + 0.025 * sum(p.square().sum() for p in m[0].parameters())

    ref = _ift(model, hp, with_sgd_decay, _mse, TB, VB)
    without = _ift(model, hp, _penalised, _mse, TB, VB)
    assert float((_flat(ref) - _flat(without)).abs().max()) > 1e-4  # the decay matters here
    _close_to(grads, ref, rtol=1e-9, atol=1e-12)


def test_a_state_loaded_into_optimizers_listing_parameters_in_another_order_is_refused() -> None:
    # Before: torch.optim loads by position, so two same-shaped layers listed in the other order
    # silently swapped their momentum buffers, and the hyperparameters their Adam moments and rates.
    def build(swap: bool) -> tuple[nn.Module, nn.Module, hg.Implicit]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)).to(DT)
        hp = nn.ModuleDict(
            {"a": hg.hparams.WeightDecay(model, "global", 0.1), "b": hg.hparams.Hparam(0.5, dtype=DT)}
        )
        layers = [model[2], model[0], model[4]] if swap else [model[0], model[2], model[4]]
        inner = torch.optim.SGD([p for m in layers for p in m.parameters()], lr=0.1, momentum=0.9)
        outer = torch.optim.Adam(
            [
                {"params": list(hp["a"].parameters()), "lr": 0.01},
                {"params": list(hp["b"].parameters()), "lr": 0.1},
            ]
        )
        hopt = hg.Implicit(
            model,
            hp,
            lambda m, h, b: _penalised(m, h["a"], b) * h["b"](),
            _mse,
            inner_optimizer=inner,
            outer_optimizer=outer,
            solver=hg.Neumann(steps=2),
        )
        return model, hp, hopt

    model, hp, hopt = build(False)
    for _ in range(2):
        hopt.step(TB)
    hopt.hyper_step(train_batch=TB, val_batch=VB)
    buf = io.BytesIO()
    torch.save(hopt.state_dict(), buf)
    _, _, same = build(False)
    buf.seek(0)
    same.load_state_dict(torch.load(buf, weights_only=True))  # same order: loads
    _, hp2, swapped = build(True)
    before = copy.deepcopy(swapped.state_dict())
    buf.seek(0)
    with pytest.raises(
        ValueError,
        match=r"inner_optimizer held the parameters in another order \(param_groups\[0\], position 0: "
        r"saved '0.weight', "
        r"here '2.weight'\)",
    ):
        swapped.load_state_dict(torch.load(buf, weights_only=True))
    assert all(torch.equal(p, before["hparams"][k]) for k, p in hp2.state_dict().items())
    state = hopt.state_dict()
    state["optimizer_params"] = {**state["optimizer_params"], "outer_optimizer": [["b.raw"], ["a.raw.0"]]}
    with pytest.raises(
        ValueError, match=r"outer_optimizer held .*\[0\], position 0: saved 'b.raw', here 'a.raw.0'"
    ):
        same.load_state_dict(state)
