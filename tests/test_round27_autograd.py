"""Round 27 (autograd): models and losses built from autograd features research code relies on:
custom ``torch.autograd.Function`` (with and without ``@once_differentiable``),
``torch.utils.checkpoint`` (reentrant and not), ``torch.func`` transforms inside the loss,
``saved_tensors_hooks`` / ``save_on_cpu`` around it.

Ground truth is independent of the library: the implicit-function-theorem formula assembled here
with plain autograd on the real model (float64), central differences of the real ``torch.optim``
training, closed forms, or the same model without the feature (checkpointing changes no value).

Bugs fixed with these tests (each failed before its fix):

1. A custom ``autograd.Function`` whose ``backward`` is ``@once_differentiable``, on the path from
   the training loss to the weights: torch's guard (a ``DelayedError`` node) hangs off fake leaves,
   so ``torch.autograd.grad(..., inputs=weights, create_graph=True)`` never reaches it, and where
   the function takes the loss's own gradient (a custom loss) no guard is built at all. Every
   Hessian-vector product and replayed update then treats its gradient as a constant: Implicit's
   hypergradient was 1.5 to 7 times its own norm off the same function with a differentiable
   backward (entries of the wrong sign), Unrolled's 7-41% off (reverse and forward mode),
   ``MarginalLikelihood(through_map=True)``'s 23 times, without a word (fix: a clear
   error naming the function). Likewise a backward computed under ``torch.no_grad()`` (or with
   NumPy, ``.detach()``) where the gradient flowing into it requires grad.
2. ``MarginalLikelihood`` (the default fixed-weights hypergradient, and ``log_evidence_bound``) on a
   model with ``torch.utils.checkpoint(..., use_reentrant=True)`` (torch's default): the per-example
   Jacobians fall back to ``autograd.grad``, which the reentrant checkpoint refuses ("incompatible
   with .grad()"), although ``through_map=True`` and every other family take it
   (fix: the bound's terms run inside ``differentiable_twice``).
3. ``WeightDecay.penalty`` called inside a ``torch.func`` transform (a vmapped per-example loss that
   adds the penalty): Implicit and Unrolled (reverse, checkpointed) raised torch's "autograd.Function
   ... must override the setup_context staticmethod", about the penalty's internal first-order
   shortcut, a custom Function the user never wrote (fix: the ordinary penalty there).
4. ``ExampleWeights(index)`` inside a ``torch.func`` transform: its index range check reads the
   indices on the host, and even ``step`` crashed with "Cannot access data pointer of Tensor that
   doesn't have storage" (fix: the check is skipped there).

Not covered here (reported): ``.detach()`` of a weight-dependent tensor that the training loss uses
(a TD(0) / self-distillation target) makes every method differentiate training against a frozen
copy of it, silently (Unrolled 29% off the real training's central differences on a TD(0)
regression); a warning that noted such detaches also fired on truncated-BPTT hidden states.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

import hypergrad as hg

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _flat(ts: Any) -> Tensor:
    return torch.cat([t.reshape(-1).to(DT) for t in ts])


def _rel(got: Tensor, want: Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _dense_ift(model: nn.Module, hp: nn.Module, train: Any, val: Any, tb: Any, vb: Any) -> Tensor:
    r"""Plain-autograd IFT at the model's current weights:
    :math:`\partial_\lambda L_V - M^\top H^{-1}\partial_w L_V` (what ``Implicit(solver=Direct())``
    computes), built row by row on the real model (no library code)."""
    ws = [p for p in model.parameters() if p.requires_grad]
    hs = list(hp.parameters())

    def full(gs: Any, xs: list[Tensor]) -> list[Tensor]:
        return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, xs, strict=True)]

    g = _flat(torch.autograd.grad(train(model, hp, tb), ws, create_graph=True))
    rows_h, rows_m = [], []
    for i in range(g.numel()):
        r = full(torch.autograd.grad(g[i], ws + hs, retain_graph=True, allow_unused=True), ws + hs)
        rows_h.append(_flat(r[: len(ws)]))
        rows_m.append(_flat(r[len(ws) :]))
    h, m = torch.stack(rows_h), torch.stack(rows_m)
    gv = full(torch.autograd.grad(val(model, hp, vb), ws + hs, allow_unused=True), ws + hs)
    return _flat(gv[len(ws) :]) - m.T @ torch.linalg.solve(h, _flat(gv[: len(ws)]))


def _real_training_fd(
    build: Callable[[], tuple[nn.Module, nn.Module]],
    train: Any,
    val: Any,
    batches: list[Any],
    vb: Any,
    lr: float,
    eps: float = 1e-6,
) -> Tensor:
    """Central differences of the validation loss after plain ``torch.optim.SGD`` training, with
    respect to every raw hyperparameter entry."""
    _, hp0 = build()
    out = []
    for k, h0 in enumerate(hp0.parameters()):
        for j in range(h0.numel()):
            vals = []
            for s in (1.0, -1.0):
                model, hp = build()
                with torch.no_grad():
                    list(hp.parameters())[k].view(-1)[j] += s * eps
                opt = torch.optim.SGD(model.parameters(), lr=lr)
                for b in batches:
                    opt.zero_grad()
                    train(model, hp, b).backward()
                    opt.step()
                with torch.no_grad():
                    vals.append(float(val(model, hp, vb)))
            out.append((vals[0] - vals[1]) / (2 * eps))
    return torch.tensor(out, dtype=DT)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def _data(n: int = 12) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, 1, generator=g, dtype=DT)


def _val(m: nn.Module, h: Any, b: Any) -> Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


# ------------------------------------------------------------ custom autograd.Function


class _Square(torch.autograd.Function):
    """x ** 2 with a differentiable backward (a double backward that autograd records)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _SquareOnce(torch.autograd.Function):
    """The same function, its backward marked ``@once_differentiable`` (as fused CUDA extensions,
    Dirichlet's rsample and many research layers are)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _SquareOnceJvp(_SquareOnce):
    """With a forward-mode rule too (``Unrolled(mode="forward")`` needs one)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        ctx.x = x
        return x * x

    @staticmethod
    def jvp(ctx: Any, t: Tensor) -> Tensor:
        return 2 * ctx.x * t


def _custom_train(fn: type[torch.autograd.Function], where: str) -> Callable[..., Tensor]:
    def train(m: nn.Module, h: Any, b: Any) -> Tensor:
        x, y = b
        if where == "loss":  # a custom loss: its backward takes the loss's own gradient (ones)
            return fn.apply(m(x) - y).mean() + h.penalty(m)
        # an activation between the layers
        hidden = fn.apply(m[0](x))
        return ((m[2](m[1](hidden)) - y) ** 2).mean() + h.penalty(m)

    return train


@pytest.mark.parametrize("where", ["loss", "hidden"])
def test_a_twice_differentiable_custom_function_gives_the_dense_ift(where: str) -> None:
    # New coverage (passes): a custom autograd.Function whose backward autograd can differentiate,
    # as a custom loss and as an activation, under Implicit(Direct) against the plain-autograd IFT.
    model, (x, y) = _mlp(), _data()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.1)
    train = _custom_train(_Square, where)
    hopt = hg.Implicit(
        model,
        hp,
        train,
        _val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.Direct(),
    )
    got = _flat(hopt.hypergradient(train_batch=(x, y), val_batch=(x, y))[0])
    want = _dense_ift(model, hp, train, _val, (x, y), (x, y))
    assert _rel(got, want) < 1e-9, (got, want)


@pytest.mark.parametrize("where", ["loss", "hidden"])
def test_implicit_refuses_a_once_differentiable_function_on_the_weights_path(where: str) -> None:
    """torch's once_differentiable guard is never reached by ``autograd.grad(inputs=weights)``:
    the HVPs treat the function's gradient as a constant. Before: a relative error of 1.5
    (``where="loss"``, the first entry of the wrong sign) and 7.1 (``"hidden"``) to the same
    function with a differentiable backward (the test above), no error, no warning. Now a
    RuntimeError naming the function, and nothing moves."""
    model, (x, y) = _mlp(), _data()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.1)
    hopt = hg.Implicit(
        model,
        hp,
        _custom_train(_SquareOnce, where),
        _val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.Direct(),
    )
    before = [p.detach().clone() for p in hp.parameters()]
    with pytest.raises(RuntimeError, match="_SquareOnce.*once_differentiable"):
        hopt.hyper_step(train_batch=(x, y), val_batch=(x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, hp.parameters(), strict=True))


class _SquareNoGraph(_Square):
    """A backward computed without recording (``torch.no_grad()``: as with NumPy or ``.detach()``
    inside it), no ``@once_differentiable`` to say so."""

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            return 2 * x * g


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_a_custom_backward_without_a_graph_on_the_weights_path_is_refused(method: str) -> None:
    """A gradient that requires grad flows into the backward and none comes out: its derivative is
    lost (Implicit: a relative error of 7.1 to the differentiable backward's hypergradient, the
    same as once_differentiable's, silently). Now a RuntimeError naming the function. (Where the
    incoming gradient is the loss's own constant one, ``where="loss"``, nothing tells the two
    apart: not covered.)"""
    model, (x, y) = _mlp(), _data()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.1)
    train = _custom_train(_SquareNoGraph, "hidden")
    inner = torch.optim.SGD(model.parameters(), lr=0.3)
    outer = torch.optim.SGD(hp.parameters(), lr=0.1)
    if method == "implicit":
        hopt: Any = hg.Implicit(model, hp, train, _val, inner_optimizer=inner, outer_optimizer=outer)
    else:
        hopt = hg.Unrolled(model, hp, train, _val, inner_optimizer=inner, outer_optimizer=outer, steps=2)
    for _ in range(2):
        hopt.step((x, y))
    with pytest.raises(RuntimeError, match="_SquareNoGraph.*without an autograd graph"):
        hopt.hypergradient(train_batch=(x, y), val_batch=(x, y))


@pytest.mark.parametrize("mode", ["reverse", "checkpoint", "forward"])
def test_unrolled_refuses_a_once_differentiable_function_on_the_weights_path(mode: str) -> None:
    """The replayed updates differentiate the training gradient: with a once_differentiable
    activation its second derivative was dropped: 6.8% off here in every mode (41% with three
    steps on other data) from the same function with a differentiable backward, which matches
    central differences of the real training (the test below), silently."""
    model, (x, y) = _mlp(), _data()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.1)
    hopt = hg.Unrolled(
        model,
        hp,
        _custom_train(_SquareOnceJvp, "hidden"),
        _val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        steps=2,
        mode="forward" if mode == "forward" else "reverse",
        checkpoint=mode == "checkpoint",
    )
    for _ in range(2):
        hopt.step((x, y))
    with pytest.raises(RuntimeError, match="_SquareOnceJvp.*once_differentiable"):
        hopt.hypergradient(val_batch=(x, y))


class _SquaredNet(nn.Module):
    def __init__(self, fn: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.a, self.b, self.fn = nn.Linear(3, 4), nn.Linear(4, 2), fn

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.fn.apply(self.a(x)))


def test_marginal_likelihood_through_the_map_refuses_a_once_differentiable_function() -> None:
    """``through_map=True`` differentiates the MAP objective twice (implicit function theorem):
    with a once_differentiable activation the hypergradient had a relative error of 23 to the
    same network with a differentiable backward (whose default fixed-weights hypergradient, first
    order, it still equals: checked here too). Now a RuntimeError naming the function."""

    def run(fn: type[torch.autograd.Function], through_map: bool) -> Tensor:
        torch.manual_seed(0)
        model = _SquaredNet(fn).to(DT)
        hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer", init=1.0)}).to(DT)
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(8, 3, generator=g, dtype=DT), torch.randint(0, 2, (8,), generator=g)
        hopt = hg.MarginalLikelihood(
            model,
            hp,
            likelihood="classification",
            data_size=8,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
            subset_size=8,
            burn_in=0,
            every=1,
            through_map=through_map,
        )
        for _ in range(2):
            hopt.step((x, y))
        return _flat(hopt.hypergradient(train_batch=(x, y))[0])

    assert _rel(run(_SquareOnce, False), run(_Square, False)) < 1e-12  # (first order: exact)
    with pytest.raises(RuntimeError, match="_SquareOnce.*once_differentiable"):
        run(_SquareOnce, True)


def test_forward_mode_through_a_once_differentiable_loss_is_exact() -> None:
    # Passes before and after the fix (which must not refuse it): in forward mode a custom loss
    # whose backward is once_differentiable passes its tangents on (torch detaches its outputs
    # only where a gradient flowing in requires grad, which the loss's own gradient does not):
    # the hypergradient equals the twice-differentiable function's.
    out = []
    for fn in (_SquareOnceJvp, _Square):
        model, (x, y) = _mlp(), _data()
        hp = hg.hparams.WeightDecay(model, per="layer", init=0.1)
        hopt = hg.Unrolled(
            model,
            hp,
            _custom_train(fn, "loss"),
            _val,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
            steps=2,
            mode="forward" if fn is _SquareOnceJvp else "reverse",
        )
        for _ in range(2):
            hopt.step((x, y))
        out.append(_flat(hopt.hypergradient(val_batch=(x, y))[0]))
    assert _rel(out[0], out[1]) < 1e-12, out


def test_unrolled_through_a_twice_differentiable_custom_function_matches_the_real_training() -> None:
    # New coverage (passes): the control of the test above, against central differences of the
    # real torch.optim training (the replay differentiates the custom backward's own graph).
    batches = [_data(12) for _ in range(2)]
    train = _custom_train(_Square, "hidden")

    def build() -> tuple[nn.Module, nn.Module]:
        model = _mlp()
        return model, hg.hparams.WeightDecay(model, per="layer", init=0.1)

    model, hp = build()
    hopt = hg.Unrolled(
        model,
        hp,
        train,
        _val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        steps=2,
    )
    for b in batches:
        hopt.step(b)
    got = _flat(hopt.hypergradient(val_batch=batches[0])[0])
    want = _real_training_fd(build, train, _val, batches, batches[0], lr=0.3)
    assert _rel(got, want) < 1e-6, (got, want)


def test_a_once_differentiable_function_off_the_weights_path_is_accepted() -> None:
    # Passes before and after the fix (the fix must keep it): a once_differentiable function in
    # val_loss (differentiated once) and on the data in train_loss (its backward never runs for
    # the weights) changes nothing; the hypergradient is the plain-autograd IFT.
    model, (x, y) = _mlp(), _data()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.1)
    xr = x.clone().requires_grad_(True)  # (a data tensor that requires grad: the function records)

    def train(m: nn.Module, h: Any, b: Any) -> Tensor:
        inp, t = b
        return ((m(_SquareOnce.apply(inp)) - t) ** 2).mean() + h.penalty(m)

    def val(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _SquareOnce.apply(m(b[0]) - b[1]).mean()

    hopt = hg.Implicit(
        model,
        hp,
        train,
        val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.Direct(),
    )
    got = _flat(hopt.hypergradient(train_batch=(xr, y), val_batch=(x, y))[0])
    want = _dense_ift(model, hp, train, val, (xr, y), (x, y))
    assert _rel(got, want) < 1e-9, (got, want)


# ------------------------------------------------------------ torch.utils.checkpoint


class _CheckpointedNet(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.stem, self.block, self.head = nn.Linear(3, 3), nn.Linear(3, 5), nn.Linear(5, 2)
        self.reentrant = reentrant

    def _block(self, h: Tensor) -> Tensor:
        return torch.tanh(self.block(h))

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        if self.reentrant is not None:
            h = torch.utils.checkpoint.checkpoint(self._block, h, use_reentrant=self.reentrant)
        else:
            h = self._block(h)
        return self.head(h)


def _marglik_hypergradient(reentrant: bool | None, through_map: bool) -> tuple[Tensor, float]:
    torch.manual_seed(0)
    model = _CheckpointedNet(reentrant).to(DT)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer", init=1.0)}).to(DT)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, generator=g, dtype=DT), torch.randint(0, 2, (8,), generator=g)
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="classification",
        data_size=8,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        subset_size=8,
        burn_in=0,
        every=1,
        through_map=through_map,
    )
    for _ in range(2):
        hopt.step((x, y))
    grads, info = hopt.hypergradient(train_batch=(x, y))
    return _flat(grads), float(info.outer_loss)


@pytest.mark.parametrize(
    ("reentrant", "through_map"),
    [
        (True, False),
        (True, True),  # (passes: the bound is evaluated inside Implicit's differentiable_twice)
        (False, False),  # (passes)
    ],
)
def test_marginal_likelihood_through_a_checkpointed_block_equals_the_plain_model(
    reentrant: bool, through_map: bool
) -> None:
    """Checkpointing changes no value: the evidence bound and its hypergradient on the
    checkpointed model equal the plain model's (same weights, same steps). Before, the default
    (fixed-weights) hypergradient raised torch's "When use_reentrant=True, torch.utils.checkpoint
    is incompatible with .grad()" from the per-example Jacobians' fallback (vmap cannot batch the
    reentrant CheckpointFunction), on torch's default checkpoint."""
    want, want_loss = _marglik_hypergradient(None, through_map)
    got, got_loss = _marglik_hypergradient(reentrant, through_map)
    assert _rel(got, want) < 1e-10, (got, want)
    assert got_loss == pytest.approx(want_loss, rel=1e-12)


# ------------------------------------------------------------ torch.func inside the loss


def _train_vmap_gradient_penalty(m: nn.Module, h: Any, b: Any) -> Tensor:
    """Per-example squared errors by ``vmap`` over ``functional_call``, plus an input-gradient
    penalty by ``vmap(grad(...))`` (third derivatives in Unrolled's replay) and the decay."""
    x, y = b
    params = dict(m.named_parameters())

    def one(xi: Tensor) -> Tensor:
        return torch.func.functional_call(m, params, (xi[None],)).sum()

    per = torch.func.vmap(lambda xi, yi: (one(xi) - yi.sum()) ** 2)(x, y)
    gx = torch.func.vmap(torch.func.grad(one))(x)
    return per.mean() + 0.1 * (gx**2).sum(-1).mean() + h.penalty(m)


def test_torch_func_transforms_in_the_training_loss_give_the_dense_ift_and_the_real_training() -> None:
    # New coverage (passes): vmap + functional_call + grad inside train_loss, through Implicit's
    # HVPs (against the plain-autograd IFT) and Unrolled's replay in both modes (against central
    # differences of the real training).
    batches = [_data(8) for _ in range(2)]

    def build() -> tuple[nn.Module, nn.Module]:
        model = _mlp()
        return model, hg.hparams.WeightDecay(model, per="layer", init=0.1)

    model, hp = build()
    imp = hg.Implicit(
        model,
        hp,
        _train_vmap_gradient_penalty,
        _val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.Direct(),
    )
    got = _flat(imp.hypergradient(train_batch=batches[0], val_batch=batches[1])[0])
    want = _dense_ift(model, hp, _train_vmap_gradient_penalty, _val, batches[0], batches[1])
    assert _rel(got, want) < 1e-9, (got, want)

    want = _real_training_fd(build, _train_vmap_gradient_penalty, _val, batches, batches[1], lr=0.3)
    for mode in ("reverse", "forward"):
        model, hp = build()
        hopt = hg.Unrolled(
            model,
            hp,
            _train_vmap_gradient_penalty,
            _val,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
            steps=2,
            mode=mode,
        )
        for b in batches:
            hopt.step(b)
        got = _flat(hopt.hypergradient(val_batch=batches[1])[0])
        assert _rel(got, want) < 1e-6, (mode, got, want)


def _train_penalty_inside_vmap(m: nn.Module, h: Any, b: Any) -> Tensor:
    """Per-example losses, each with the decay's penalty, by ``vmap`` (the mean is the usual
    penalised loss)."""
    x, y = b
    params = dict(m.named_parameters())

    def one(xi: Tensor, yi: Tensor) -> Tensor:
        return ((torch.func.functional_call(m, params, (xi[None],)) - yi) ** 2).sum() + h.penalty(m)

    return torch.func.vmap(one)(x, y).mean()


@pytest.mark.parametrize(
    "method",
    [
        "implicit",
        "reverse",
        "forward",  # (passes: the replay in forward mode takes the ordinary penalty)
    ],
)
def test_a_weight_decay_penalty_inside_vmap_gives_the_true_hypergradient(method: str) -> None:
    """``hp.penalty(model)`` inside a vmapped per-example loss: ``step`` trains, but Implicit and
    Unrolled (reverse) raised torch's "In order to use an autograd.Function with functorch
    transforms ..., it must override the setup_context staticmethod", about the penalty's internal
    shortcut (a custom Function), which the user never wrote. Against the plain-autograd IFT and
    central differences of the real training (fix: the ordinary penalty inside a
    transform)."""
    batches = [_data(8) for _ in range(2)]
    train = _train_penalty_inside_vmap

    def build() -> tuple[nn.Module, nn.Module]:
        model = _mlp()
        return model, hg.hparams.WeightDecay(model, per="layer", init=0.1)

    model, hp = build()
    if method == "implicit":
        imp = hg.Implicit(
            model,
            hp,
            train,
            _val,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
            solver=hg.Direct(),
        )
        got = _flat(imp.hypergradient(train_batch=batches[0], val_batch=batches[1])[0])
        want = _dense_ift(model, hp, train, _val, batches[0], batches[1])
        assert _rel(got, want) < 1e-9, (got, want)
        return
    hopt = hg.Unrolled(
        model,
        hp,
        train,
        _val,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        steps=2,
        mode=method,
    )
    for b in batches:
        hopt.step(b)
    got = _flat(hopt.hypergradient(val_batch=batches[1])[0])
    want = _real_training_fd(build, train, _val, batches, batches[1], lr=0.3)
    assert _rel(got, want) < 1e-6, (got, want)


def _train_example_weights_inside_vmap(m: nn.Module, h: Any, b: Any) -> Tensor:
    """Per-example losses weighted by ``ExampleWeights`` inside ``vmap``, plus a learned penalty."""
    x, y, index = b
    params = dict(m.named_parameters())

    def one(xi: Tensor, yi: Tensor, i: Tensor) -> Tensor:
        err = ((torch.func.functional_call(m, params, (xi[None],)) - yi) ** 2).sum()
        return h["ew"](i[None]).sum() * err

    return torch.func.vmap(one)(x, y, index).mean() + h["s"]() * (m[2].weight ** 2).sum()


@pytest.mark.parametrize("method", ["implicit", "reverse", "forward"])
def test_example_weights_inside_vmap_give_the_true_hypergradient(method: str) -> None:
    """``ExampleWeights(index)`` inside a vmapped per-example loss: its range check reads the
    indices on the host, which have no storage inside a transform, so even ``step`` crashed with
    "RuntimeError: Cannot access data pointer of Tensor that doesn't have storage" (naming
    neither the weights nor vmap). Checked against the plain-autograd IFT (Implicit) and central
    differences of the real training (Unrolled) since the fix."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, generator=g, dtype=DT), torch.randn(16, 1, generator=g, dtype=DT)
    batches = [(x[:8], y[:8], torch.arange(8)), (x[8:], y[8:], torch.arange(8, 16))]
    train = _train_example_weights_inside_vmap

    def build() -> tuple[nn.Module, nn.Module]:
        model = _mlp()
        weights = hg.hparams.ExampleWeights(16, dtype=DT)
        return model, nn.ModuleDict({"ew": weights, "s": hg.hparams.Hparam(torch.tensor(0.1, dtype=DT))})

    model, hp = build()
    inner = torch.optim.SGD(model.parameters(), lr=0.3)
    outer = torch.optim.SGD(hp.parameters(), lr=0.1)
    if method == "implicit":
        imp = hg.Implicit(
            model, hp, train, _val, inner_optimizer=inner, outer_optimizer=outer, solver=hg.Direct()
        )
        got = _flat(imp.hypergradient(train_batch=batches[0], val_batch=batches[1])[0])
        want = _dense_ift(model, hp, train, _val, batches[0], batches[1])
        assert _rel(got, want) < 1e-9, (got, want)
        return
    hopt = hg.Unrolled(
        model, hp, train, _val, inner_optimizer=inner, outer_optimizer=outer, steps=2, mode=method
    )
    for b in batches:
        hopt.step(b)
    got = _flat(hopt.hypergradient(val_batch=batches[1])[0])
    want = _real_training_fd(build, train, _val, batches, batches[1], lr=0.3)
    assert _rel(got, want) < 1e-6, (got, want)


# ------------------------------------------------------------ saved-tensor hooks around the loss


@pytest.mark.parametrize("hooks", ["save_on_cpu", "clone"])
def test_saved_tensor_hooks_around_the_losses_change_no_hypergradient(hooks: str) -> None:
    # New coverage (passes): saved-tensor hooks (offloading with save_on_cpu, or packing copies)
    # wrapped around both losses, under Implicit's HVPs and Unrolled's replay (reverse mode,
    # momentum): the hypergradients equal those without hooks, bit for bit on CPU.
    def ctx() -> Any:
        if hooks == "save_on_cpu":
            return torch.autograd.graph.save_on_cpu()
        return torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach().clone(), lambda t: t)

    def make(with_hooks: bool) -> tuple[Any, Any]:
        def train(m: nn.Module, h: Any, b: Any) -> Tensor:
            with ctx() if with_hooks else contextlib.nullcontext():
                return ((m(b[0]) - b[1]) ** 2).mean() + h.penalty(m)

        def val(m: nn.Module, h: Any, b: Any) -> Tensor:
            with ctx() if with_hooks else contextlib.nullcontext():
                return _val(m, h, b)

        return train, val

    batches = [_data(8) for _ in range(2)]
    out: dict[bool, list[Tensor]] = {}
    for with_hooks in (False, True):
        train, val = make(with_hooks)
        model = _mlp()
        hp = hg.hparams.WeightDecay(model, per="parameter", init=0.1)
        imp = hg.Implicit(
            model,
            hp,
            train,
            val,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
            solver=hg.Neumann(steps=5, alpha=0.1),
        )
        a = _flat(imp.hypergradient(train_batch=batches[0], val_batch=batches[1])[0])
        model = _mlp()
        hp = hg.hparams.WeightDecay(model, per="parameter", init=0.1)
        unr = hg.Unrolled(
            model,
            hp,
            train,
            val,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
            steps=2,
        )
        for b in batches:
            unr.step(b)
        out[with_hooks] = [a, _flat(unr.hypergradient(val_batch=batches[1])[0])]
    for plain, hooked in zip(out[False], out[True], strict=True):
        assert torch.equal(plain, hooked)
