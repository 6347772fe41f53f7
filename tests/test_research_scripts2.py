"""More training scripts with hypergrad dropped in, each against a reference computed without it.

Float64, tiny sizes. References: a dense implicit-function-theorem formula built with
``torch.autograd`` on the real model (Implicit with ``hg.Direct``), central finite differences of
the validation loss after re-running the same inner steps with plain ``torch.optim`` and its
schedulers (Unrolled), the same steps unrolled by hand with ``torch.func.functional_call``, or a
hand-written loop (hg.optim).

* Gradient accumulation over micro-batches with learned class weights and label smoothing (the
  penalty added once per micro-batch).
* Per-example weights (hyper-cleaning) with ``ignore_index`` targets.
* Adam with two param groups (own lr and weight decay) under ``OneCycleLR`` cycling the learning
  rates *and* ``beta1`` between steps, with a hyperstep inside the window.
* ``torch.nn.utils.parametrizations.orthogonal`` and ``spectral_norm`` on a layer.
* ``nn.Embedding(padding_idx=0)``, a GRU and ``nn.MultiheadAttention`` with a key padding mask.
* A temperature read by a forward hook from the hyperparameter module (not from the loss's
  ``hparams`` argument), reverse and forward mode.
* Values computed under ``torch.no_grad()`` in the model: constants of reverse mode (the
  autograd unroll), followed by forward mode (finite differences); an operation forward-mode AD
  cannot follow (spectral_norm's power iteration, packed sequences) is named with the fix.
* ``val_loss`` evaluating an EMA (``AveragedModel``) copy: a DisconnectedWarning from Implicit
  too (it returned 0 silently).
* hg.optim.SGDHD with a group added and a group frozen mid-run, against a loop written out.
* Resuming mid-run into fresh objects (CG / Neumann warm starts, a power-iteration estimate,
  AdamHD as the inner optimiser, a forward-mode ring): bit-identical continuations.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg
from hypergrad.testing import central_difference, dense_ift_hypergradient

DT = torch.float64


# ----------------------------------------------------------------------------- references


_ift = dense_ift_hypergradient  # the dense IFT reference


def _flat(ts: Any) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _fd_of_torch_training(
    model: nn.Module,
    hp: nn.Module,
    make: Callable[[nn.Module], tuple[torch.optim.Optimizer, Any]],
    start: tuple[dict[str, Tensor], dict[str, Any], dict[str, Any] | None],
    train_loss: Any,
    val_loss: Any,
    batches: Sequence[Any],
    val_batch: Any,
    eps: float = 1e-6,
) -> list[Tensor]:
    """Central differences of L_V after ``batches`` plain torch.optim steps (with the scheduler
    ``make`` builds stepping after each) from the saved ``start`` (weights, optimiser state,
    scheduler state), with each hyperparameter entry perturbed."""

    def objective() -> float:
        m = copy.deepcopy(model)
        m.load_state_dict(start[0])
        opt, sched = make(m)
        opt.load_state_dict(copy.deepcopy(start[1]))
        if sched is not None and start[2] is not None:
            sched.load_state_dict(start[2])
        for b in batches:
            opt.zero_grad()
            train_loss(m, hp, b).backward(inputs=[p for p in m.parameters() if p.requires_grad])
            opt.step()
            if sched is not None:
                sched.step()
        with torch.no_grad():
            return float(val_loss(m, hp, val_batch))

    return [central_difference(objective, p, eps) for p in hp.parameters()]


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer, sched: Any = None) -> Any:
    return (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(opt.state_dict()),
        None if sched is None else copy.deepcopy(sched.state_dict()),
    )


def _close(got: Any, ref: Any, rtol: float, atol: float) -> None:
    torch.testing.assert_close(_flat(got), _flat(ref), rtol=rtol, atol=atol)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- 1. micro-batches


class _ClassHparams(nn.Module):
    def __init__(self, model: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.cw = hg.hparams.Hparam(torch.linspace(0.5, 1.5, n_classes, dtype=DT))  # class weights
        self.wd = hg.hparams.WeightDecay(model, per="layer", init=0.05)


def _weighted_smoothed_ce(logits: Tensor, y: Tensor, cw: Tensor, smoothing: float) -> Tensor:
    """``F.cross_entropy(logits, y, weight=cw, label_smoothing=smoothing)`` written out, since
    torch's kernel refuses a ``weight`` that requires grad."""
    logp = logits.log_softmax(-1)
    n_cls = logits.shape[-1]
    nll = -logp.gather(1, y[:, None]).squeeze(1)
    smooth = -(logp * cw).sum(-1) / n_cls
    wy = cw[y]
    return ((1 - smoothing) * (wy * nll).sum() + smoothing * smooth.sum()) / wy.sum()


def _accumulating_loss(micro: int, smoothing: float = 0.1) -> Callable[[nn.Module, Any, Any], Tensor]:
    def loss(m: nn.Module, h: Any, b: Any) -> Tensor:
        x, y = b
        total = torch.zeros((), dtype=DT)
        for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):  # as loss / micro; backward()
            total = total + (_weighted_smoothed_ce(m(xs), ys, h.cw(), smoothing) + h.wd.penalty(m)) / micro
        return total

    return loss


def _plain_ce(m: nn.Module, h: Any, b: Any) -> Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _cls_data(seed: int, n: int = 24, n_in: int = 3, n_cls: int = 3) -> tuple[Tensor, Tensor]:
    g = _gen(seed)
    return torch.randn(n, n_in, generator=g, dtype=DT), torch.randint(0, n_cls, (n,), generator=g)


def _cls_mlp(seed: int = 0, n_in: int = 3, n_cls: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, 4), nn.Tanh(), nn.Linear(4, n_cls)).to(DT)


def test_written_out_weighted_smoothed_ce_is_torchs() -> None:
    logits, y = torch.randn(7, 3, dtype=DT), torch.randint(0, 3, (7,))
    cw = torch.tensor([0.5, 1.0, 2.0], dtype=DT)
    ref = F.cross_entropy(logits, y, weight=cw, label_smoothing=0.2)
    torch.testing.assert_close(_weighted_smoothed_ce(logits, y, cw, 0.2), ref, rtol=1e-14, atol=0)


def test_micro_batch_accumulation_with_class_weights_and_smoothing_matches_the_ift() -> None:
    """Three micro-batches per step, each adding its weighted, smoothed cross-entropy and the
    (per-layer) decay penalty divided by 3: Implicit equals the dense IFT at the same weights."""
    model = _cls_mlp()
    hp = _ClassHparams(model, 3)
    tl = _accumulating_loss(3)
    tb, vb = _cls_data(0), _cls_data(1)
    hopt = hg.Implicit(
        model,
        hp,
        tl,
        _plain_ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=hg.Direct(),
    )
    for _ in range(30):
        hopt.step(tb)
    got, _ = hopt.hypergradient(train_batch=tb, val_batch=vb)
    ref = _ift(model, hp, tl, _plain_ce, tb, vb)
    assert float(_flat(ref).abs().min()) > 1e-5  # every class weight and decay matters
    _close(got, ref, rtol=1e-9, atol=1e-12)


def test_micro_batch_accumulation_unrolled_matches_fd() -> None:
    """Same loss, Unrolled through 3 SGD-momentum steps: the penalty called once per micro-batch
    (the replay's first-order shortcut sums the calls) against finite differences."""
    model = _cls_mlp()
    hp = _ClassHparams(model, 3)
    tl = _accumulating_loss(3)
    batches = [_cls_data(10 + i) for i in range(5)]
    vb = _cls_data(1)

    def make(m: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        return torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.5), None

    inner, _ = make(model)
    hopt = hg.Unrolled(
        model,
        hp,
        tl,
        _plain_ce,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=3,
    )
    for b in batches[:2]:
        hopt.step(b)
    start = _snapshot(model, inner)
    for b in batches[2:]:
        hopt.step(b)
    got, _ = hopt.hypergradient(val_batch=vb)
    fd = _fd_of_torch_training(model, hp, make, start, tl, _plain_ce, batches[2:], vb)
    assert float(_flat(fd).abs().min()) > 1e-6
    _close(got, fd, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- 2. hyper-cleaning


def _cleaning_loss(m: nn.Module, h: Any, b: Any) -> Tensor:
    x, y, index = b
    per_example = F.cross_entropy(m(x), y, reduction="none", ignore_index=-100)  # 0 where ignored
    w = h(index) * (y != -100)
    return (w * per_example).sum() / w.sum()


def test_example_weights_with_ignored_targets_match_fd_and_the_ift() -> None:
    """Per-example weights normalised over the labelled examples of each batch, some targets
    ``ignore_index``: the ignored examples' weights get exactly 0, the others match finite
    differences of plain torch.optim training (Unrolled) and the dense IFT (Implicit)."""
    n = 12
    x, y = _cls_data(3, n=n)
    y[[1, 6, 7]] = -100
    index = torch.arange(n)
    batches = [(x[i : i + 6], y[i : i + 6], index[i : i + 6]) for i in (0, 6, 3, 0)]
    xv, yv = _cls_data(4, n=10)
    vb = (xv, yv)

    model = _cls_mlp()
    hp = hg.hparams.ExampleWeights(n, init=0.6, dtype=DT)

    def make(m: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        return torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9, nesterov=True), None

    inner, _ = make(model)
    hopt = hg.Unrolled(
        model,
        hp,
        _cleaning_loss,
        _plain_ce,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=3,
    )
    hopt.step(batches[0])
    start = _snapshot(model, inner)
    for b in batches[1:]:
        hopt.step(b)
    (got,), _ = hopt.hypergradient(val_batch=vb)
    (fd,) = _fd_of_torch_training(model, hp, make, start, _cleaning_loss, _plain_ce, batches[1:], vb)
    assert got[[1, 6, 7]].abs().max() == 0
    assert fd[[0, 2, 3, 4, 5, 8, 9, 10, 11]].abs().min() > 1e-6
    torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-9)

    # Implicit at a (near-)optimum of one full batch
    model = _cls_mlp(1)
    hp = hg.hparams.ExampleWeights(n, init=0.6, dtype=DT)
    full = (x, y, index)
    imp = hg.Implicit(
        model,
        hp,
        _cleaning_loss,
        _plain_ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=hg.Direct(),
    )
    for _ in range(20):
        imp.step(full)
    (got,), _ = imp.hypergradient(train_batch=full, val_batch=vb)
    (ref,) = _ift(model, hp, _cleaning_loss, _plain_ce, full, vb)
    assert got[[1, 6, 7]].abs().max() == 0
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-13)


# ----------------------------------------------------------------------------- 3. Adam + OneCycle


def _reg_data(seed: int, n: int = 16) -> tuple[Tensor, Tensor]:
    g = _gen(seed)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, 1, generator=g, dtype=DT)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def _mse(m: nn.Module, h: Any, b: Any) -> Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


def _penalised(m: nn.Module, h: Any, b: Any) -> Tensor:
    return _mse(m, h, b) + h.penalty(m)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_adam_groups_under_one_cycle_cycling_betas_match_fd(mode: str) -> None:
    """Adam with a group per layer (own lr, own coupled weight decay), OneCycleLR stepping the
    learning rates and beta1 after every inner step, a hyperstep in between: the replay of the
    last 4 steps uses each step's own lr and betas, as finite differences of the same torch
    run show."""
    model = _mlp()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)

    def make(m: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        opt = torch.optim.Adam(
            [
                {"params": m[0].parameters(), "lr": 0.05, "weight_decay": 0.01},
                {"params": m[2].parameters(), "lr": 0.02},
            ]
        )
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.05, 0.02], total_steps=12)

    inner, sched = make(model)
    hopt = hg.Unrolled(
        model,
        hp,
        _penalised,
        _mse,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.5),
        steps=4,
        mode=mode,
    )
    batches = [_reg_data(20 + i) for i in range(9)]
    vb = _reg_data(2)
    for i, b in enumerate(batches):
        if i == len(batches) - 4:
            start = _snapshot(model, inner, sched)
        hopt.step(b)
        sched.step()
        if i == 6:  # inside the window: the replay runs all 4 steps with the new values
            hopt.hyper_step(val_batch=vb)
    betas = {g["betas"][0] for g in inner.param_groups}
    assert betas and max(betas) < 0.95  # beta1 was cycled
    got, _ = hopt.hypergradient(val_batch=vb)
    fd = _fd_of_torch_training(model, hp, make, start, _penalised, _mse, batches[-4:], vb)
    assert float(_flat(fd).abs().min()) > 1e-6
    _close(got, fd, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- 4. orthogonal


def _orthogonal_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)).to(DT)
    torch.nn.utils.parametrizations.orthogonal(model[0])
    return model


def test_orthogonal_parametrization_matches_the_ift_and_fd() -> None:
    """A layer under ``parametrizations.orthogonal`` (the trained tensor is ``original``; the
    weight is its matrix exponential image): Implicit equals the dense IFT, Unrolled (Adam)
    finite differences."""
    tb, vb = _reg_data(5, 24), _reg_data(6, 24)
    model = _orthogonal_mlp()
    hp = hg.hparams.WeightDecay(model, per="parameter", init=0.05)
    assert "0.parametrizations.weight.original" in dict(model.named_parameters())
    imp = hg.Implicit(
        model,
        hp,
        _penalised,
        _mse,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=hg.Direct(),
    )
    for _ in range(20):
        imp.step(tb)
    got, _ = imp.hypergradient(train_batch=tb, val_batch=vb)
    ref = _ift(model, hp, _penalised, _mse, tb, vb)
    assert float(_flat(ref).abs().max()) > 1e-4
    _close(got, ref, rtol=1e-8, atol=1e-12)

    model = _orthogonal_mlp()
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)

    def make(m: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        return torch.optim.Adam(m.parameters(), lr=0.05), None

    inner, _ = make(model)
    hopt = hg.Unrolled(
        model,
        hp,
        _penalised,
        _mse,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=3,
    )
    hopt.step(tb)
    start = _snapshot(model, inner)
    batches = [_reg_data(30 + i) for i in range(3)]
    for b in batches:
        hopt.step(b)
    got, _ = hopt.hypergradient(val_batch=vb)
    fd = _fd_of_torch_training(model, hp, make, start, _penalised, _mse, batches, vb)
    assert float(_flat(fd).abs().min()) > 1e-6
    _close(got, fd, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- 5. sequences


class _SeqModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.gru = nn.GRU(4, 4, batch_first=True)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        pad = tokens == 0
        h, _ = self.gru(self.emb(tokens))
        a, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
        keep = (~pad).to(a.dtype)[..., None]
        return self.out((a * keep).sum(1) / keep.sum(1))


def _seq_batch(seed: int, n: int = 6) -> tuple[Tensor, Tensor]:
    g = _gen(seed)
    tokens = torch.randint(1, 7, (n, 5), generator=g)
    lengths = torch.randint(2, 6, (n,), generator=g)
    tokens[torch.arange(5)[None, :] >= lengths[:, None]] = 0  # right padding
    return tokens, torch.randint(0, 2, (n,), generator=g)


def test_padded_sequences_through_embedding_gru_and_attention_match_fd() -> None:
    """``Embedding(padding_idx=0)``, a GRU and attention with a key padding mask, a decay per
    layer, Adam through 3 steps: against finite differences; the padding row never moves."""
    torch.manual_seed(0)
    model = _SeqModel().to(DT)
    with torch.no_grad():
        model.emb.weight[0] = 0.0
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)

    def tl(m: nn.Module, h: Any, b: Any) -> Tensor:
        return F.cross_entropy(m(b[0]), b[1]) + h.penalty(m)

    def vl(m: nn.Module, h: Any, b: Any) -> Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    def make(m: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        return torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.5), None

    inner, _ = make(model)
    hopt = hg.Unrolled(
        model,
        hp,
        tl,
        vl,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=3,
    )
    batches = [_seq_batch(40 + i) for i in range(4)]
    vb = _seq_batch(50, 8)
    hopt.step(batches[0])
    start = _snapshot(model, inner)
    for b in batches[1:]:
        hopt.step(b)
    assert float(model.emb.weight[0].detach().abs().max()) == 0.0  # the padding row has no gradient
    got, _ = hopt.hypergradient(val_batch=vb)
    fd = _fd_of_torch_training(model, hp, make, start, tl, vl, batches[1:], vb)
    assert float(_flat(fd).abs().max()) > 1e-5
    _close(got, fd, rtol=1e-5, atol=1e-10)


# ----------------------------------------------------------------------------- 6. hooks


class _TempHparams(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.temperature = hg.hparams.Hparam(torch.tensor(1.5, dtype=DT))
        self.wd = hg.hparams.WeightDecay(model, per="global", init=0.05)


def _hooked_model(hp_holder: list[nn.Module]) -> nn.Module:
    model = _cls_mlp()

    def scale(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return output / hp_holder[0].temperature()  # read from the module, not the loss argument

    model[2].register_forward_hook(scale)
    return model


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_temperature_read_by_a_forward_hook_from_the_hparams_module_matches_fd(mode: str) -> None:
    """A forward hook that divides the logits by a temperature it reads from the hyperparameter
    module (a closure, as scripts write it) rather than from the ``hparams`` the loss gets: the
    replays see the hyperparameters they differentiate, in both modes."""
    holder: list[nn.Module] = []
    model = _hooked_model(holder)
    hp = _TempHparams(model)
    holder.append(hp)

    def tl(m: nn.Module, h: Any, b: Any) -> Tensor:
        return F.cross_entropy(m(b[0]), b[1]) + h.wd.penalty(m)

    def make(m: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        return torch.optim.SGD(m.parameters(), lr=0.5), None

    inner, _ = make(model)
    hopt = hg.Unrolled(
        model,
        hp,
        tl,
        _plain_ce,
        inner_optimizer=inner,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=3,
        mode=mode,
    )
    batches = [_cls_data(60 + i) for i in range(3)]
    vb = _cls_data(7)
    start = _snapshot(model, inner)
    for b in batches:
        hopt.step(b)
    got, _ = hopt.hypergradient(val_batch=vb)
    fd = _fd_of_torch_training(model, hp, make, start, tl, _plain_ce, batches, vb)
    assert float(_flat(fd).abs().min()) > 1e-6
    _close(got, fd, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- 7. spectral norm


def _spectral_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    torch.nn.utils.parametrizations.spectral_norm(model[0])
    return model


def _two_decays(m: nn.Module, h: Any, b: Any) -> Tensor:
    d, ps = h(), dict(m.named_parameters())
    return _mse(m, h, b) + 0.5 * (
        d[0] * (ps["0.parametrizations.weight.original"] ** 2).sum() + d[1] * (ps["2.weight"] ** 2).sum()
    )


def _unrolled_by_hand(
    model: nn.Module, hp: nn.Module, start: Any, train_loss: Any, batches: Sequence[Any], vb: Any
) -> Tensor:
    """3 SGD(lr=0.3, momentum=0.5) steps from ``start`` unrolled with ``torch.func.functional_call``
    on a copy of the model (its buffers updated by the forward passes, as in training), then
    dL_V/d(hp.raw) by autograd."""
    copy_ = copy.deepcopy(model)
    copy_.load_state_dict(start[0])
    names = [n for n, _ in copy_.named_parameters()]
    w = [p.detach().clone().requires_grad_(True) for p in copy_.parameters()]
    buf = [start[1]["state"][i]["momentum_buffer"].clone() for i in range(len(w))]
    for b in batches:
        loss = train_loss(_Substituted(copy_, dict(zip(names, w, strict=True))), hp, b)
        g = torch.autograd.grad(loss, w, create_graph=True)
        buf = [m * 0.5 + gi for m, gi in zip(buf, g, strict=True)]
        w = [wi - 0.3 * m for wi, m in zip(w, buf, strict=True)]
    for a, r in zip(w, model.parameters(), strict=True):  # the same steps as the real ones
        torch.testing.assert_close(a.detach(), r.detach(), rtol=0, atol=1e-14)
    lv = _mse(_Substituted(copy_, dict(zip(names, w, strict=True))), hp, vb)
    return torch.autograd.grad(lv, hp.raw)[0]


def _sgd_momentum(m: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    return torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.5), None


def test_spectral_norm_matches_a_written_out_unroll_and_forward_mode_names_what_it_cannot_follow() -> None:
    """``parametrizations.spectral_norm`` runs a power iteration on its buffers under
    ``no_grad`` in every training forward pass. Reverse mode equals 3 SGD-momentum steps
    unrolled by hand with ``torch.func.functional_call`` (1e-10), and finite differences of the
    torch run to 2% (they also see the power iteration follow the weights, which autograd,
    hypergrad and higher leave out: 0.8% here). Forward mode cannot get through the iteration
    (forward AD follows ``no_grad`` into an ``out=`` operation): it failed with torch's "Trying
    to use forward AD with div_out ... out= function"; the error now says to use reverse mode."""
    batches = [_reg_data(30 + i) for i in range(4)]
    vb = _reg_data(2)
    got = {}
    for mode in ("reverse", "forward"):
        model = _spectral_mlp()
        hp = hg.hparams.Hparam(torch.tensor([0.05, 0.05], dtype=DT))
        inner, _ = _sgd_momentum(model)
        hopt = hg.Unrolled(
            model,
            hp,
            _two_decays,
            _mse,
            inner_optimizer=inner,
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
            steps=3,
            mode=mode,
        )
        hopt.step(batches[0])
        start = _snapshot(model, inner)
        for b in batches[1:]:
            hopt.step(b)
        if mode == "forward":
            with pytest.raises(RuntimeError, match=r"mode='forward'.*out= function.*mode='reverse'"):
                hopt.hypergradient(val_batch=vb)
            continue
        (got[mode],), _ = hopt.hypergradient(val_batch=vb)
        ref = _unrolled_by_hand(model, hp, start, _two_decays, batches[1:], vb)
        torch.testing.assert_close(got[mode], ref, rtol=1e-10, atol=1e-14)
        (fd,) = _fd_of_torch_training(model, hp, _sgd_momentum, start, _two_decays, _mse, batches[1:], vb)
        assert fd.abs().min() > 1e-4
        torch.testing.assert_close(got[mode], fd, rtol=2e-2, atol=0)


class _ScaledUnderNoGrad(nn.Module):
    """An MLP whose hidden activations are divided by their RMS, computed under ``no_grad``."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.l1(x))
        with torch.no_grad():
            scale = h.pow(2).mean().sqrt()
        return self.l2(h / scale)


def test_no_grad_values_are_constants_in_reverse_mode_and_followed_in_forward_mode() -> None:
    """A scale computed under ``torch.no_grad()`` from the activations: autograd records
    nothing there, so reverse mode (like higher and torchopt) treats it as a constant and equals
    the hand-written autograd unroll, [-8.0e-3, 4.0e-4]; forward mode follows it (PyTorch's
    forward AD ignores ``no_grad``) and equals finite differences of the real training,
    [1.4e-2, 6.4e-5]. Documented in ``Unrolled``'s docstring; both are tested here so that a
    change of either is seen."""
    batches = [_reg_data(10 + i) for i in range(4)]
    vb = _reg_data(2)
    got, refs = {}, {}
    for mode in ("reverse", "forward"):
        torch.manual_seed(0)
        model = _ScaledUnderNoGrad().to(DT)
        hp = hg.hparams.Hparam(torch.tensor([0.05, 0.05], dtype=DT))

        def tl(m: nn.Module, h: Any, b: Any) -> Tensor:
            d, ps = h(), dict(m.named_parameters())
            return _mse(m, h, b) + 0.5 * (
                d[0] * (ps["l1.weight"] ** 2).sum() + d[1] * (ps["l2.weight"] ** 2).sum()
            )

        inner, _ = _sgd_momentum(model)
        hopt = hg.Unrolled(
            model,
            hp,
            tl,
            _mse,
            inner_optimizer=inner,
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
            steps=3,
            mode=mode,
        )
        hopt.step(batches[0])
        start = _snapshot(model, inner)
        for b in batches[1:]:
            hopt.step(b)
        (got[mode],), _ = hopt.hypergradient(val_batch=vb)
        if mode == "reverse":
            refs[mode] = _unrolled_by_hand(model, hp, start, tl, batches[1:], vb)
        else:
            (refs[mode],) = _fd_of_torch_training(model, hp, _sgd_momentum, start, tl, _mse, batches[1:], vb)
        assert refs[mode].abs().min() > 1e-5
    torch.testing.assert_close(got["reverse"], refs["reverse"], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got["forward"], refs["forward"], rtol=1e-5, atol=1e-10)
    assert float((got["forward"] - got["reverse"]).abs().max()) > 1e-3  # the documented difference


def test_pure_forward_mode_follows_no_grad_and_names_an_operation_it_cannot_follow() -> None:
    lam = torch.tensor([0.5, 1.5], dtype=DT, requires_grad=True)

    def outer(h: Sequence[Tensor]) -> Tensor:
        w = torch.stack([h[0][0] * h[0][1], h[0][1] ** 2])
        with torch.no_grad():
            scale = w.norm()
        return (w / scale).sum() ** 2 + w.sum() ** 2

    g_fwd, _ = hg.unrolled_hypergradient(outer, [lam], mode="forward")
    fd = central_difference(lambda: float(outer([lam]).detach()), lam, eps=1e-6)
    torch.testing.assert_close(g_fwd[0], fd, rtol=1e-7, atol=1e-9)  # the function's derivative

    def packed(h: Sequence[Tensor]) -> Tensor:
        x = h[0].reshape(1, 2, 1).expand(2, 2, 1) * 1.0
        seq = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([2, 1]), batch_first=True)
        return seq.data.sum()

    with pytest.raises(RuntimeError, match=r"mode='forward'.*_pack_padded_sequence.*mode='reverse'"):
        hg.unrolled_hypergradient(packed, [lam], mode="forward")


class _Substituted(nn.Module):
    """``module`` called with ``params`` substituted (``torch.func.functional_call``), with
    ``named_parameters`` giving them, as a loss expects of its model."""

    def __init__(self, module: nn.Module, params: dict[str, Tensor]) -> None:
        super().__init__()
        self.inner = [module]
        self.params = params

    def forward(self, x: Tensor) -> Tensor:
        return torch.func.functional_call(self.inner[0], self.params, (x,))

    def named_parameters(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return iter(self.params.items())


# ----------------------------------------------------------------------------- 8. EMA weights


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_val_loss_on_an_ema_copy_is_named_not_a_silent_zero(method: str) -> None:
    """``val_loss`` evaluating an ``AveragedModel`` (EMA) copy instead of the model it is given:
    its weights are other tensors, so no path leads from the hyperparameters to L_V and the
    hypergradient is exactly 0. Unrolled said so (DisconnectedWarning); Implicit returned the 0
    silently (the mixed term, computed with a zero vector, counted as a connection)."""
    model = _mlp()
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)
    )
    hp = hg.hparams.WeightDecay(model, per="layer", init=0.05)

    def vl(m: nn.Module, h: Any, b: Any) -> Tensor:
        return _mse(ema, h, b)

    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = torch.optim.SGD(hp.parameters(), lr=0.1)
    if method == "implicit":
        hopt: hg.HyperOptimizer = hg.Implicit(
            model, hp, _penalised, vl, inner_optimizer=inner, outer_optimizer=outer, solver=hg.CG(maxiter=5)
        )
    else:
        hopt = hg.Unrolled(model, hp, _penalised, vl, inner_optimizer=inner, outer_optimizer=outer, steps=2)
    b = _reg_data(0)
    for _ in range(3):
        hopt.step(b)
        ema.update_parameters(model)
    with pytest.warns(hg.DisconnectedWarning, match="does not reach the losses"):
        info = hopt.hyper_step(train_batch=b, val_batch=b)
    assert info.hypergrad_norm == 0.0

    # evaluated on the model it is given, the same loss is connected (no warning)
    hopt.val_loss = _mse
    info = hopt.hyper_step(train_batch=b, val_batch=b)
    assert info.hypergrad_norm > 0


# ----------------------------------------------------------------------------- 9. hg.optim


def test_sgdhd_with_a_group_added_and_a_group_frozen_mid_run_matches_a_written_out_loop() -> None:
    """SGDHD (momentum, a group with its own lr and weight decay); a third group added after 3
    steps; the second frozen (``requires_grad_(False)``) for two steps and then trained again.
    Against the update of Baydin et al. written out: each group's rate moves by
    ``hypergrad_lr * sum <grad F(θ_{t-1}), d_{t-1}>`` over its weights that had a direction last
    step (a frozen weight forgets its direction, keeps its momentum buffer), then SGD steps."""
    g = _gen(8)
    a, b, c = (torch.randn(n, generator=g, dtype=DT).requires_grad_(True) for n in (3, 2, 2))

    def f(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        return (
            0.5 * (a**2).sum()
            + (a.sum() - 1) * b.sum()
            + ((b - 0.5) ** 4).sum()
            + (c * a[:2]).sum()
            + (c**2).sum()
        )

    opt = hg.optim.SGDHD(
        [{"params": [a]}, {"params": [b], "lr": 0.05, "weight_decay": 0.1}],
        lr=0.1,
        hypergrad_lr=1e-3,
        momentum=0.5,
    )
    ref = {"a": a.detach().clone(), "b": b.detach().clone(), "c": c.detach().clone()}
    lrs, wds, groups = [0.1, 0.05], [0.0, 0.1], [["a"], ["b"]]
    bufs: dict[str, Tensor] = {}
    prev: dict[str, Tensor] = {}
    for t in range(9):
        if t == 3:
            opt.add_param_group({"params": [c], "lr": 0.2})
            groups.append(["c"])
            lrs.append(0.2)
            wds.append(0.0)
        frozen = t in (5, 6)
        b.requires_grad_(not frozen)
        opt.zero_grad()
        f(a, b, c).backward(inputs=[p for p in (a, b, c) if p.requires_grad])
        opt.step()

        r = {k: v.clone().requires_grad_(True) for k, v in ref.items()}
        live = [k for k in ("a", "b", "c") if not (k == "b" and frozen) and (k != "c" or t >= 3)]
        grads = dict(
            zip(live, torch.autograd.grad(f(r["a"], r["b"], r["c"]), [r[k] for k in live]), strict=True)
        )
        for gi, names in enumerate(groups):
            eff = {k: grads[k] + wds[gi] * ref[k] for k in names if k in grads}
            h = sum(float((eff[k] * prev[k]).sum()) for k in eff if k in prev)
            lrs[gi] = max(lrs[gi] + 1e-3 * h, 0.0)
            for k in names:
                if k not in eff:
                    prev.pop(k, None)
                    continue
                bufs[k] = eff[k].clone() if k not in bufs else bufs[k] * 0.5 + eff[k]
                ref[k] = ref[k] - lrs[gi] * bufs[k]
                prev[k] = bufs[k]
        assert [gr["lr"] for gr in opt.param_groups] == pytest.approx(lrs, rel=1e-13)
    assert all(abs(v - v0) > 1e-4 for v, v0 in zip(lrs, [0.1, 0.05, 0.2], strict=True))  # all moved
    for k, v in {"a": a, "b": b, "c": c}.items():
        torch.testing.assert_close(v.detach(), ref[k], rtol=1e-13, atol=1e-14)


# ----------------------------------------------------------------------------- 10. resume


def _resumable(kind: str, seed: int, init: float) -> tuple[nn.Module, nn.Module, hg.HyperOptimizer]:
    model = _mlp(seed)
    hp = hg.hparams.WeightDecay(model, per="parameter", init=init)
    outer = torch.optim.Adam(hp.parameters(), lr=0.05)
    if kind == "cg-warm":
        inner: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        solver: hg.LinearSolver = hg.CG(maxiter=3, warm_start=True)
    elif kind == "neumann-power-warm":
        inner, solver = torch.optim.Adam(model.parameters(), lr=0.01), hg.Neumann(steps=3, warm_start=True)
    elif kind == "adamhd-inner":
        inner, solver = hg.optim.AdamHD(model.parameters(), lr=0.01, hypergrad_lr=1e-4), hg.CG(maxiter=3)
    else:
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return (
            model,
            hp,
            hg.Unrolled(
                model,
                hp,
                _penalised,
                _mse,
                inner_optimizer=inner,
                outer_optimizer=outer,
                steps=3,
                mode="forward",
            ),
        )
    return (
        model,
        hp,
        hg.Implicit(model, hp, _penalised, _mse, inner_optimizer=inner, outer_optimizer=outer, solver=solver),
    )


@pytest.mark.parametrize("kind", ["cg-warm", "neumann-power-warm", "adamhd-inner", "unrolled-forward"])
def test_resume_mid_run_into_fresh_objects_is_bit_identical(kind: str) -> None:
    """Saved after 13 steps and 3 hypersteps (a warm-start solution, a power-iteration estimate,
    AdamHD's tuned rate and directions, a ring two steps into its window), loaded with
    ``torch.load(weights_only=True)`` into objects built from other weights and decays: the
    next 15 steps and 4 hypersteps repeat the straight run bit for bit."""
    batches = [_reg_data(100 + i) for i in range(28)]

    def run(hopt: hg.HyperOptimizer, span: range) -> list[float]:
        out = []
        for i in span:
            hopt.step(batches[i])
            if i % 4 == 3:
                out.append(hopt.hyper_step(train_batch=batches[i], val_batch=batches[0]).outer_loss)
        return out

    model, hp, hopt = _resumable(kind, 0, 0.05)
    run(hopt, range(13))
    buf = io.BytesIO()
    torch.save(hopt.state_dict(), buf)
    straight = run(hopt, range(13, 28))
    model2, hp2, hopt2 = _resumable(kind, 5, 0.3)
    buf.seek(0)
    hopt2.load_state_dict(torch.load(buf, weights_only=True))
    assert run(hopt2, range(13, 28)) == straight
    for a, b in ((model, model2), (hp, hp2)):
        assert all(
            torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
        )
    if kind == "adamhd-inner":
        assert (
            hopt2.inner_optimizer.param_groups[0]["lr"] == hopt.inner_optimizer.param_groups[0]["lr"] != 0.01
        )
