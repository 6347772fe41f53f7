"""Round 27: false refusals and false warnings from the checks added this round.

Legitimate research code must still run silently and correctly under the new checks (weights
whose storage is replaced outside ``step()``, hyperparameters read from elsewhere than the
loss's ``hparams`` argument, ``once_differentiable`` custom functions, tensors the model keeps in
plain attributes, states saved by the previous version, param groups held at a rate of 0).
Each case compares with the same run without the triggering action, or with plain autograd.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import hypergrad as hg

DT = torch.float64


def _data(n: int = 8, d_in: int = 3, d_out: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d_in, generator=g, dtype=DT), torch.randn(n, d_out, generator=g, dtype=DT)


def _mse(model: nn.Module, hparams: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _mse_decayed(
    model: nn.Module, hparams: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    return _mse(model, hparams, batch) + hparams.penalty(model)


# ----------------------------------------------------------------------------- storage moved, values kept


def _frozen_and_trained() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    model[0].requires_grad_(False)  # a frozen first layer (a pretrained stem)
    return model


def _unrolled_after(share: bool) -> tuple[tuple[torch.Tensor, ...], list[warnings.WarningMessage]]:
    model = _frozen_and_trained()
    trained = [p for p in model.parameters() if p.requires_grad]
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2).to(DT)
    hopt = hg.Unrolled(
        model,
        hp,
        _mse_decayed,
        _mse,
        inner_optimizer=torch.optim.SGD(trained, lr=0.1, momentum=0.5),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        steps=3,
    )
    batch = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hopt.step(batch)
        hopt.step(batch)
        if share:
            model.share_memory()  # e.g. before handing the model to evaluation worker processes
        hopt.step(batch)
        grads, _ = hopt.hypergradient(val_batch=batch)
    return tuple(g.detach().clone() for g in grads), list(caught)


def test_unrolled_share_memory_mid_window_keeps_the_episode() -> None:
    """``model.share_memory()`` (Hogwild, worker processes for evaluation) moves every weight's
    storage into shared memory in place: same tensors, same storage objects, same values, no
    version bump, only another address. Since this round the episode check compares data
    pointers (to see ``p.data = best``), so this ended the episode ("the weights were changed
    outside hopt.step() ... re-initialisation?") and the hypergradient silently covered the last
    step only (-3.2e-5 for -1.0e-4 on the first decay). Reference: the same run without the call.
    """
    want, quiet = _unrolled_after(share=False)
    assert not [w for w in quiet if issubclass(w.category, hg.ReplayWarning)]
    got, caught = _unrolled_after(share=True)
    replay = [str(w.message)[:120] for w in caught if issubclass(w.category, hg.ReplayWarning)]
    assert not replay, replay
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- param groups at a rate of 0


class _TwoBlocks(nn.Module):
    """Ridge regression split over two parameters (two param groups)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(2, 1, dtype=DT))
        self.b = nn.Parameter(torch.zeros(2, 1, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2] @ self.a + x[:, 2:] @ self.b


class _LogLam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log_lam = nn.Parameter(torch.tensor(-1.0, dtype=DT))


def _ridge_train(
    model: nn.Module, hparams: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    penalty = (model.a**2).sum() + (model.b**2).sum()
    return _mse(model, hparams, batch) + hparams.log_lam.exp() * penalty / 2


def test_implicit_sgdhd_group_clamped_at_zero_is_not_held() -> None:
    """hg.optim.SGDHD clamps a group's rate at ``lr_min = 0`` when its hypergradient pushes it
    below (its docs: "do not move"; the next step's ``h = |g|^2 > 0`` raises it again, before the
    update). Since this round Implicit takes a group at rate 0 beside a positive one for a frozen
    backbone and leaves its weights out of the solve, so a hyperstep taken while SGDHD sat at the
    floor differentiated only through the other group: -0.04085 for the IFT's -0.03949, with
    Direct, status "converged" and no warning, although the very next step moves those weights.
    Reference: the closed-form IFT hypergradient of ridge regression at the current weights."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, generator=g, dtype=DT), torch.randn(20, 1, generator=g, dtype=DT)
    xv, yv = torch.randn(10, 4, generator=g, dtype=DT), torch.randn(10, 1, generator=g, dtype=DT)
    model, hp = _TwoBlocks(), _LogLam()
    inner = hg.optim.SGDHD(
        [{"params": [model.a]}, {"params": [model.b], "lr": 0.05}], lr=0.1, hypergrad_lr=1e-3
    )
    hopt = hg.Implicit(
        model,
        hp,
        _ridge_train,
        _mse,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.Direct(),
    )
    for _ in range(5):
        hopt.step((x, y))
    inner.param_groups[1]["lr"] = 0.0  # where SGDHD's own rule clamps it (lr_min=0)
    w = torch.cat([model.a.detach(), model.b.detach()])
    lam = hp.log_lam.detach().exp()
    hessian = 2 * x.T @ x / len(x) + lam * torch.eye(4, dtype=DT)
    g_val = 2 * xv.T @ (xv @ w - yv) / len(xv)
    want = -(g_val.T @ torch.linalg.solve(hessian, lam * w)).reshape(())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (got,), info = hopt.hypergradient(train_batch=(x, y), val_batch=(xv, yv))
    # (the premise: SGDHD's next step raises the rate and moves b)
    hopt.step((x, y))
    assert inner.param_groups[1]["lr"] > 0 and not torch.equal(model.b.detach(), w[2:])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)


# ------------------------------------------------------------------------- WeightDecay states and wrappers


def _blocks(wrapped: bool) -> nn.Module:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    model = nn.Sequential()
    for i in range(2):
        block = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
        model.add_module(f"block{i}", checkpoint_wrapper(block) if wrapped else block)
    model.add_module("head", nn.Linear(3, 1))
    return model.to(DT)


@pytest.mark.parametrize("saved_wrapped", [True, False])
def test_weight_decay_state_moves_between_blocks_wrapped_one_by_one_and_plain(saved_wrapped: bool) -> None:
    """Activation checkpointing applied block by block (``checkpoint_wrapper``, what
    ``apply_activation_checkpointing`` does; ``block = torch.compile(block)`` likewise inserts
    ``_orig_mod.``) while training, and not for evaluation: the model's own ``state_dict`` moves
    between the two (torch strips the wrapper's prefix), the WeightDecay entries decay the same
    weights in the same order, but the layout code added this round hashes the wrapper's segment
    in the middle of the names, so ``hp.load_state_dict(saved)`` raised "saved with its weight
    decays on other weights than here". Reference: each entry loaded by position, as before."""
    src = hg.hparams.WeightDecay(_blocks(saved_wrapped), per="layer", init=1e-2)
    with torch.no_grad():
        for i, raw in enumerate(src.parameters()):
            raw.fill_(-float(i + 1))
    saved = src.state_dict()
    target_model = _blocks(not saved_wrapped)
    assert target_model.state_dict().keys() == _blocks(saved_wrapped).state_dict().keys()  # (torch's own)
    target = hg.hparams.WeightDecay(target_model, per="layer", init=1e-3)
    target.load_state_dict(saved)
    for got, want in zip(target.parameters(), src.parameters(), strict=True):
        assert torch.equal(got, want)


# ------------------------------------------------------------------ plain containers of no hyperparameters


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc, self.out = nn.Linear(3, 4).to(DT), nn.Linear(4, 1).to(DT)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], dtype=DT)[:, None] / 10.0
        return torch.tanh(self.fc(x + torch.sin(pos * torch.arange(1, 4, dtype=DT))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x).mean(1))


class _Cluttered(_Plain):
    """The same function, through the plain attributes research models keep: a list of buffers,
    a tuple of shapes, a positional-encoding cache filled in forward, a tuple of masks, a view of
    a parameter kept for logging, and a torch.nn.utils.prune reparametrisation (identity mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("one", torch.ones(4, dtype=DT))
        self.register_buffer("zero", torch.zeros(4, dtype=DT))
        self.affine = [self.one, self.zero]
        self.shapes = (torch.Size([4]), (3,))
        self.pe: dict[int, torch.Tensor] = {}
        self.masks = (torch.ones(5, dtype=DT),)
        self.bias_head = self.fc.bias[:2]  # (read by no forward: a logging view)
        prune.identity(self.out, "weight")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t not in self.pe:
            pos = torch.arange(t, dtype=DT)[:, None] / 10.0
            self.pe[t] = torch.sin(pos * torch.arange(1, 4, dtype=DT))
        h = torch.tanh(self.fc(x + self.pe[t])) * self.affine[0] + self.affine[1]
        return h * self.masks[0][None, :, None]


def _penalised(
    model: nn.Module, hparams: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    penalty = sum((p**2).sum() for p in model.parameters())
    return _mse(model, hparams, batch) + hparams.log_lam.exp() * penalty / 2


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_plain_containers_of_other_tensors_are_neither_refused_nor_warned_about(mode: str) -> None:
    """(Passes: covers this round's attribute scans, _aliased_attributes and _held_slots, on
    tensors that are no hyperparameters, which earlier rounds' tests do not hold.) The cluttered
    model computes the plain one's function; the hypergradient, with hypersteps every step so that
    steps before the window are replayed with their recorded values, must be the plain model's,
    with no warning."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, 3, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT)
    out = []
    for cls in (_Plain, _Cluttered):
        model, hp = cls(), _LogLam()
        hopt = hg.Unrolled(
            model,
            hp,
            _penalised,
            _mse,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.5),
            steps=2,
            mode=mode,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                hopt.step((x, y))
                hopt.hyper_step(val_batch=(x, y))
            (grad,), _ = hopt.hypergradient(val_batch=(x, y))
        out.append(grad)
    assert out[0].abs() > 1e-8
    torch.testing.assert_close(out[1], out[0], rtol=1e-10, atol=0)


# ----------------------------------------------------------------- MarginalLikelihood, weights in plain lists


class _TiedDecoder(nn.Module):
    """A decoder reading the encoder's weight (weight tying), registered or through a plain list."""

    def __init__(self, through_list: bool) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.enc = nn.Linear(3, 4).to(DT)
        self.through_list = through_list
        if through_list:
            self.tied = [self.enc.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.tied[0] if self.through_list else self.enc.weight
        return torch.tanh(self.enc(x)) @ w


@pytest.mark.parametrize("through_map", [False, True])
def test_marginal_likelihood_substitutes_a_weight_the_model_reads_from_a_plain_list(
    through_map: bool,
) -> None:
    """This round Unrolled and Implicit substitute weights held in plain list / tuple / dict
    attributes (_held_slots); MarginalLikelihood's Jacobians (vmap over jacrev of a substituted
    call) still wrote the registered places only, so the decoder's read of ``self.tied[0]`` was
    the real weight, a constant: ``info.outer_loss`` 5.16 for the network's 5.30, the noise's
    hypergradient through the MAP -0.22 for -1.17, with no warning. Reference: the same network
    reading the weight where it is registered."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, generator=g, dtype=DT), torch.randn(16, 3, generator=g, dtype=DT)
    out = []
    for through_list in (False, True):
        model = _TiedDecoder(through_list)
        hp = nn.ModuleDict(
            {
                "prior": hg.hparams.PriorPrecision(model, per="layer", init=1.0).to(DT),
                "noise": hg.hparams.ObservationNoise(init=1.0).to(DT),
            }
        )
        hopt = hg.MarginalLikelihood(
            model,
            hp,
            likelihood="regression",
            data_size=16,
            inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
            burn_in=0,
            every=1,
            through_map=through_map,
        )
        grads, info = hopt.hypergradient(train_batch=(x, y))
        out.append((info.outer_loss, [t.detach().clone() for t in grads]))
    (want_loss, want), (got_loss, got) = out
    assert got_loss == pytest.approx(want_loss, rel=1e-10)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_hypernet_substitutes_a_weight_its_base_reads_from_a_plain_list() -> None:
    """``HyperNet(base)`` generates base's weights from the hyperparameters and substitutes them
    for the call (``tensor_slots``): a tied decoder reading ``self.tied[0]`` read the template's
    fixed weight there instead, so the output (off by 1e-2 here) and its derivative with respect
    to the hyperparameters were another network's, silently. Reference: the same base reading
    the weight where it is registered."""
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=DT)
    outs, grads = [], []
    for through_list in (False, True):
        torch.manual_seed(0)
        net = hg.nn.HyperNet(_TiedDecoder(through_list), n_hparams=1).to(DT)
        h = torch.tensor([0.7], dtype=DT, requires_grad=True)
        out = net(x, hparams=h)
        (g,) = torch.autograd.grad(out.square().sum(), h)
        outs.append(out.detach())
        grads.append(g)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-14)
