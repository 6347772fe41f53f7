"""Round 8, self-tuning networks and the marginal likelihood as research scripts drive them:
checkpoints of a container whose specs were listed in another order, activation checkpointing
under Delta-STN, functional dropout left on in the evidence, and what was probed and found right
(schedulers on both optimisers with a resume inside a validation phase, BatchNorm bodies,
integers at their bounds, tau = 0, frozen and unused weights, float32 models with float64
hyperparameters, multi-output regression, the total derivative through the MAP)."""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import hypergrad as hg
from hypergrad._stn_hparams import _Mode

DT = torch.float64


def _batch(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _ce(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0], h), b[1])


# ----------------------------------------------------------------------------- spec order


def _two_rates(order: str) -> hg.SelfTuning:
    torch.manual_seed(0)
    specs = {"p": hg.hparams.Rate(0.2, high=0.9), "q": hg.hparams.Rate(0.6, high=0.9)}
    hp = hg.hparams.SelfTuned(**{k: specs[k] for k in order}, dtype=DT)
    net = hg.nn.StnLinear(4, 3, hp.size).to(DT)
    return hg.SelfTuning(
        net,
        hp,
        _ce,
        _ce,
        inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.01),
        train_steps=1,
    )


def test_a_state_of_selftuned_specs_listed_in_another_order_is_refused_changing_nothing() -> None:
    """raw's entries (and the layers' feature columns) follow the order of the specs; the saved
    specs were compared as dicts, equal in any order, so SelfTuned(q=..., p=...) took the state
    of SelfTuned(p=..., q=...) silently: p came back 0.6 and q 0.2."""
    saved = _two_rates("pq")
    saved.step(_batch(0))
    saved.hyper_step(val_batch=_batch(1))
    state = copy.deepcopy(saved.state_dict())
    other = _two_rates("qp")
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"order of the specs: saved \['p', 'q'\], here \['q', 'p'\]"):
        other.load_state_dict(state)
    assert other.hparams.current() == {"q": pytest.approx([0.6]), "p": pytest.approx([0.2])}
    kept = zip(before["hparams"].values(), other.hparams.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in kept)
    # the same order, through torch.save (weights_only), loads and continues bit for bit
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf)
    same = _two_rates("pq")
    for h, st in ((saved, state), (same, loaded)):
        h.load_state_dict(st)  # (the RNG state too: the constructions above reseeded torch)
        h.step(_batch(2))
        h.hyper_step(val_batch=_batch(3))
    assert same.hparams.history() == saved.hparams.history() and len(same.hparams.history()) == 2
    assert torch.equal(saved.hparams.raw, same.hparams.raw)
    assert torch.equal(saved.model.hnet, same.model.hnet)


def test_best_response_refuses_a_prior_saved_under_another_spec_order() -> None:
    def make(order: str) -> hg.BestResponse:
        torch.manual_seed(0)
        specs = {"a": hg.hparams.Positive(0.1), "b": hg.hparams.Rate(0.4)}
        hp = hg.hparams.SelfTuned(**{k: specs[k] for k in order}, learn_scale=False, dtype=DT)
        net = hg.nn.HyperNet(nn.Linear(4, 3).to(DT), hp.size)

        def loss(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
            return F.cross_entropy(m(b[0], hparams=h), b[1])

        return hg.BestResponse(
            net,
            hp,
            loss,
            loss,
            sampling="global",
            inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
            outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        )

    state = make("ab").state_dict()
    with pytest.raises(ValueError, match="order of the specs"):
        make("ba").load_state_dict(state)


def test_the_pure_selftuning_hypergradient_checks_its_arguments_as_the_class_does() -> None:
    """The class refuses a bad entropy weight, the pure function took it: tau = -1 gave sigma's
    gradient +0.82 (the ascent of the entropy term), NaN gave NaN, silently; another container
    or a non-scalar loss failed inside (AttributeError '_mode', autograd's "grad can be
    implicitly created only for scalar outputs")."""
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.5), dtype=DT)

    def val() -> torch.Tensor:
        return (hp.draw(1).features ** 2).sum()

    (g_raw, g_scale), lv, reached = hg.selftuning_hypergradient(val, hp, 1.0)
    s = float(hp.scale().detach())  # d/dr_s [-log sigma] with sigma = s_min + (s_max - s_min) sigmoid(r_s)
    lo, hi = hp.scale_range
    u = (s - lo) / (hi - lo)
    assert float(g_scale) == pytest.approx(-(hi - lo) * u * (1 - u) / s, rel=1e-12)
    assert float(g_raw) == 0.0 and float(lv) == 0.0 and reached.tolist() == [True, True]
    for bad in (-1.0, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="Invalid entropy_weight"):
            hg.selftuning_hypergradient(val, hp, bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="SelfTuned"):
        hg.selftuning_hypergradient(val, nn.Linear(1, 1), 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"0-dim float tensor, got a tensor of shape \(3, 1\)"):
        hg.selftuning_hypergradient(lambda: hp.draw(3).features ** 2, hp, 0.0)
    with pytest.raises(ValueError, match="Invalid entropy_weight"):
        _two_rates_with(entropy_weight=float("inf"))


def _two_rates_with(**kw: Any) -> hg.SelfTuning:
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.2, high=0.9), dtype=DT)
    net = hg.nn.StnLinear(4, 3, hp.size).to(DT)
    return hg.SelfTuning(
        net,
        hp,
        _ce,
        _ce,
        inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.01),
        **kw,
    )


@pytest.mark.parametrize("name", ["a.1", "sigma.b", "x.y"])
def test_a_spec_name_holding_a_dot_is_refused_instead_of_overwriting_a_history_column(name: str) -> None:
    """history() names entries 'name.i' and scales 'sigma.name': with **{"a.1": Rate(0.7)} next
    to a Rate(0.3, size=2) named "a", the row's "a.1" read 0.7 (entry 1 of "a" is 0.3), and a
    spec "sigma.b" = 0.2 read 0.5 (b's scale)."""
    specs = {"a": hg.hparams.Rate(0.3, size=2), "b": hg.hparams.Rate(0.4), name: hg.hparams.Rate(0.7)}
    with pytest.raises(ValueError, match=rf"the name '{name}' holds a '\.'.*'{name.replace('.', '_')}'"):
        hg.hparams.SelfTuned(**specs)
    hp = hg.hparams.SelfTuned(**{k.replace(".", "_"): v for k, v in specs.items()})
    hp._record(0, 1)
    row = hp.history()[0]
    assert row["a.0"] == pytest.approx(0.3) and row["a.1"] == pytest.approx(0.3)
    assert row[name.replace(".", "_")] == pytest.approx(0.7) and row["sigma.b"] == pytest.approx(0.5)
    assert len(row) == 2 + 2 * 4  # every value and scale in a column of its own


# ----------------------------------------------------------------------------- checkpointing


class _Checkpointed(nn.Module):
    """Checkpoints an STN layer (``where="stn"``) or ordinary layers after one (``"plain"``)."""

    def __init__(self, n: int, ck: bool, where: str) -> None:
        super().__init__()
        self.ck, self.where = ck, where
        self.l1, self.l2 = hg.nn.StnLinear(4, 8, n), hg.nn.StnLinear(8, 3, n)
        self.mid = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    def block(self, x: torch.Tensor, d: Any) -> torch.Tensor:
        return torch.tanh(self.l1(x, d))

    def forward(self, x: torch.Tensor, hp: hg.hparams.SelfTuned) -> torch.Tensor:
        d = hp.draw(len(x))
        if self.where == "stn":
            h = checkpoint(self.block, x, d, use_reentrant=False) if self.ck else self.block(x, d)
        else:
            h = self.block(x, d)
            h = checkpoint(self.mid, h, use_reentrant=False) if self.ck else self.mid(h)
        return self.l2(hg.nn.dropout(h, d["p"], self.training), d)


def _ck_stn(ck: bool, where: str, *, delta: bool, linearize: bool = True) -> hg.SelfTuning:
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3, high=0.9), dtype=DT)
    model = _Checkpointed(hp.size, ck, where).to(DT)
    with torch.no_grad():
        model.l1.hnet.normal_(0, 0.5)
        model.l2.hnet.normal_(0, 0.5)
    return hg.SelfTuning(
        model,
        hp,
        _ce,
        _ce,
        delta=delta,
        linearize=linearize,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.01),
    )


@pytest.mark.parametrize("where", ["stn", "plain"], ids=["stn-layer", "plain-layers-after-one"])
def test_delta_stn_names_activation_checkpointing_and_linearize_false_is_unchanged_by_it(where: str) -> None:
    """The checkpointed block is recomputed in the backward pass, after the linearised call
    returned: that raised torch's CheckpointError ("a different number of tensors was saved")
    after a RuntimeWarning blaming a layer called outside the model. Now a RuntimeError says
    what happened, with nothing changed; linearize=False (and plain STN) train exactly as without
    checkpointing."""
    hopt = _ck_stn(True, where, delta=True)
    before = copy.deepcopy(hopt.model.state_dict())
    with pytest.raises(RuntimeError, match=r"activation checkpointing.*linearize=False"):
        hopt.step(_batch(0))
    assert hopt.inner_steps == 0
    assert all(torch.equal(before[k], v) for k, v in hopt.model.state_dict().items())
    assert not hopt.inner_optimizer.state
    for delta, linearize in ((True, False), (False, True)):
        runs = []
        for ck in (False, True):
            h = _ck_stn(ck, where, delta=delta, linearize=linearize)
            torch.manual_seed(1)
            for i in range(3):
                h.step(_batch(i))
            grads, _ = h.hypergradient(val_batch=_batch(9))
            runs.append((h.model.state_dict(), grads))
        (w0, g0), (w1, g1) = runs
        assert all(torch.allclose(w0[k], w1[k], rtol=0, atol=1e-14) for k in w0)
        assert all(torch.allclose(a, b, rtol=0, atol=1e-14) for a, b in zip(g0, g1, strict=True))
        assert float(g0[0].abs().max()) > 1e-5


class _CheckpointedBase(nn.Module):
    def __init__(self, ck: bool) -> None:
        super().__init__()
        self.ck = ck
        self.a, self.b = nn.Sequential(nn.Linear(4, 6), nn.Tanh()), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(checkpoint(self.a, x, use_reentrant=False) if self.ck else self.a(x))


def _ck_best_response(ck: bool) -> hg.BestResponse:
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(a=hg.hparams.Positive(0.1), learn_scale=False, dtype=DT)
    net = hg.nn.HyperNet(_CheckpointedBase(ck).to(DT), hp.size, init_std=0.3)

    def loss(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0], hparams=h), b[1])

    return hg.BestResponse(
        net,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.5),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
    )


def test_best_response_refuses_activation_checkpointing_inside_the_base_changing_nothing() -> None:
    """HyperNet substitutes the generated weights for its call only; a checkpointed block of
    the base was recomputed in the step's backward pass with the template's weights: after
    three steps the weights were 0.50 away from the run without checkpointing and the
    hypergradient was -0.786 for the true -0.925, silently."""
    truth = _ck_best_response(False)
    torch.manual_seed(1)
    for i in range(3):
        truth.step(_batch(i))
    (g,), _ = truth.hypergradient(val_batch=_batch(9))
    assert float(g) == pytest.approx(-0.925, abs=1e-3)  # (what the checkpointed run must not miss)
    hopt = _ck_best_response(True)
    before = copy.deepcopy(hopt.model.state_dict())
    with pytest.raises(RuntimeError, match=r"base\.a of the HyperNet ran in the backward pass"):
        hopt.step(_batch(0))
    assert hopt.inner_steps == 0
    assert all(torch.equal(before[k], v) for k, v in hopt.model.state_dict().items())
    assert not hopt.inner_optimizer.state
    assert not any(m._forward_pre_hooks for m in hopt.model.base.modules())  # none left behind
    # a hyperstep keeps the checkpointed activations (as every hypergradient does): it is right
    hopt.load_state_dict(truth.state_dict())
    (g_ck,), _ = hopt.hypergradient(val_batch=_batch(9))
    assert float(g_ck) == pytest.approx(float(g), rel=1e-12)


# ----------------------------------------------------------------------------- a research-script loop


class _BNNet(nn.Module):
    """An ordinary body with BatchNorm (nn.Sequential), two integers acting on it, two STN layers."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh())
        self.l1, self.l2 = hg.nn.StnLinear(8, 8, n), hg.nn.StnLinear(8, 3, n)

    def forward(self, x: torch.Tensor, hp: hg.hparams.SelfTuned) -> torch.Tensor:
        d = hp.draw(len(x))
        h = hg.nn.cutout(self.body(x), d["cut"], self.training)
        h = hg.nn.random_shift(h, d["shift"], self.training)
        h = hg.nn.dropout(torch.tanh(self.l1(h, d)), d["p"], self.training)
        return self.l2(h, d)


def _bn_run() -> tuple[hg.SelfTuning, Any, Any]:
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(
        p=hg.hparams.Rate(0.3, high=0.9),
        cut=hg.hparams.Integer(0, 0, 3),  # at its floor
        shift=hg.hparams.Integer(2, 0, 2),  # at its ceiling
        dtype=DT,
    )
    model = _BNNet(hp.size).to(DT)
    with torch.no_grad():
        model.l1.hnet.normal_(0, 0.5)
        model.l2.hnet.normal_(0, 0.5)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outer = torch.optim.Adam(hp.parameters(), lr=0.02)
    hopt = hg.SelfTuning(
        model,
        hp,
        _ce,
        _ce,
        inner_optimizer=inner,
        outer_optimizer=outer,
        warmup=3,
        train_steps=2,
        val_steps=2,
        entropy_weight=0.0,
    )
    s_in = torch.optim.lr_scheduler.StepLR(inner, 3, 0.5)
    s_out = torch.optim.lr_scheduler.OneCycleLR(outer, 0.05, total_steps=50)
    return hopt, s_in, s_out


def test_schedulers_on_both_optimisers_and_a_resume_inside_a_validation_phase_are_bit_exact() -> None:
    straight, s_in, s_out = _bn_run()
    saved: list[Any] = []
    losses = []
    for i in range(11):
        straight.step(_batch(i))
        s_in.step()
        while straight.hyper_due():
            losses.append(straight.hyper_step(val_batch=_batch(100 + i)).outer_loss)
            s_out.step()
            if len(losses) == 3:  # the first hyperstep of the phase after inner step 5
                buf = io.BytesIO()
                torch.save((straight.state_dict(), s_in.state_dict(), s_out.state_dict(), i), buf)
                saved.append(buf.getvalue())
    assert len(losses) == 10
    resumed, r_in, r_out = _bn_run()
    state, a, b, at = torch.load(io.BytesIO(saved[0]))
    resumed.load_state_dict(state)
    r_in.load_state_dict(a)
    r_out.load_state_dict(b)
    assert len(resumed.hparams.history()) == 3 and resumed.hyper_due()
    again = []
    while resumed.hyper_due():  # finishes the phase: one more hyperstep
        again.append(resumed.hyper_step(val_batch=_batch(100 + at)).outer_loss)
        r_out.step()
    assert len(again) == 1
    for i in range(at + 1, 11):
        resumed.step(_batch(i))
        r_in.step()
        while resumed.hyper_due():
            again.append(resumed.hyper_step(val_batch=_batch(100 + i)).outer_loss)
            r_out.step()
    assert again == losses[3:]
    assert resumed.hparams.history() == straight.hparams.history()
    assert [r["inner_step"] for r in straight.hparams.history()] == [3, 3, 5, 5, 7, 7, 9, 9, 11, 11]
    for x, y in zip(straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert torch.equal(straight.hparams.raw, resumed.hparams.raw)
    assert r_out.get_last_lr() == s_out.get_last_lr()
    # the integers stayed in range, and moved continuously underneath
    rows = straight.hparams.history()
    assert {r["cut"] for r in rows} <= {0.0, 1.0, 2.0, 3.0} and {r["shift"] for r in rows} <= {0.0, 1.0, 2.0}


def test_hypergradient_with_batchnorm_integers_at_bounds_and_no_entropy_matches_central_differences() -> None:
    """tau = 0: sigma moves by the validation loss alone; BatchNorm uses its running statistics
    (eval mode) and they do not move; the integers reach the loss through the layers only."""
    hopt, _, _ = _bn_run()
    for i in range(4):
        hopt.step(_batch(i))
    running = hopt.model.body[1].running_mean.clone()
    vb = _batch(50, n=32)
    rng = torch.get_rng_state()
    grads, info = hopt.hypergradient(val_batch=vb)
    assert torch.equal(hopt.model.body[1].running_mean, running)
    assert hopt.model.training and hopt.model.body[1].training

    def objective() -> float:
        torch.set_rng_state(rng)
        hopt.model.eval()
        try:
            with torch.no_grad(), hopt.hparams._drawing(_Mode.VAL):
                return float(_ce(hopt.model, hopt.hparams, vb))
        finally:
            hopt.model.train()

    assert info.outer_loss == pytest.approx(objective(), rel=1e-14)
    h = 1e-6
    for p, g in zip(hopt.hparams.parameters(), grads, strict=True):
        for j in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[j] += h
            up = objective()
            with torch.no_grad():
                p.view(-1)[j] -= 2 * h
            down = objective()
            with torch.no_grad():
                p.view(-1)[j] += h
            fd = (up - down) / (2 * h)
            assert abs(fd - float(g.view(-1)[j])) < 1e-8 + 1e-6 * abs(fd), (j, fd, float(g.view(-1)[j]))
        assert float(g.abs().max()) > 1e-4


# ----------------------------------------------------------------------------- marglik: random forward


class _FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.3, self.training))


def _manual_evidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prior: Any) -> torch.Tensor:
    """log p(y | theta) - theta' P0 theta / 2 - log det(P0 + J' Lambda J) / 2 + log det P0 / 2,
    softmax likelihood, dense Jacobians of the model as it is (float64)."""
    names = list(prior.names)
    params = {n: p.detach() for n, p in model.named_parameters()}
    theta = {n: params[n] for n in names}

    def f(th: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, {**params, **th}, (x,))

    jac = torch.func.jacrev(f)(theta)
    b, c = len(x), 2
    j = torch.cat([jac[n].reshape(b * c, -1) for n in names], 1)
    prec = torch.cat([prior.precisions()[n].expand(params[n].shape).reshape(-1) for n in names])
    logits = f(theta)
    p = logits.softmax(1)
    lam = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p])
    w = torch.cat([theta[n].reshape(-1) for n in names])
    lik = -F.cross_entropy(logits, y, reduction="sum")
    return (
        lik
        - 0.5 * (prec * w**2).sum()
        - 0.5 * (torch.logdet(torch.diag(prec) + j.T @ lam @ j) - prec.log().sum())
    )


@pytest.mark.parametrize(
    ("kernel", "through_map"),
    [("auto", False), ("dense", False), ("auto", True)],
    ids=["auto", "dense", "map"],
)
def test_functional_dropout_left_on_is_refused_instead_of_a_random_evidence(
    kernel: str, through_map: bool
) -> None:
    """nn.Dropout in training mode was refused, F.dropout(h, p, self.training) was not: three
    calls of log_evidence gave -12.93, -13.62, -13.14 (the eval-mode evidence is -12.01)."""
    torch.manual_seed(0)
    model = _FunctionalDropout().to(DT)
    prior = hg.hparams.PriorPrecision(model, per="layer", init=1.3).to(DT)
    x, y = torch.randn(10, 3, dtype=DT), torch.randint(0, 2, (10,))
    with pytest.raises(ValueError, match=r"drew random numbers.*F\.dropout"):
        hg.log_evidence(model, x, y, prior, kernel=kernel)
    model.eval()
    ev = hg.log_evidence(model, x, y, prior, kernel=kernel)
    torch.testing.assert_close(ev, _manual_evidence(model, x, y, prior), rtol=1e-12, atol=1e-12)
    # in the loop: refused at hyper_step with nothing changed, fine in eval mode
    model.train()
    hp = nn.ModuleDict({"prior": prior})
    hopt = hg.MarginalLikelihood(
        model,
        hp,
        likelihood="classification",
        data_size=40,
        kernel=kernel,
        through_map=through_map,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
    )
    hopt.step((x, y))  # training with dropout is fine
    state = copy.deepcopy(hopt.state_dict())
    with pytest.raises(ValueError, match="drew random numbers"):
        hopt.hyper_step(train_batch=(x, y))
    after = hopt.state_dict()
    for key in ("model", "hparams"):
        assert all(torch.equal(a, b) for a, b in zip(state[key].values(), after[key].values(), strict=True))
    assert not hopt.outer_optimizer.state and hopt.hyper_steps == 0
    model.eval()
    info = hopt.hyper_step(train_batch=(x, y))
    assert math.isfinite(info.outer_loss) and hopt.hyper_steps == 1


def test_a_random_augmentation_still_draws_its_own_numbers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT).eval()
    aug = hg.hparams.RandomTranslation((16,), init=1.5).to(DT)
    prior = hg.hparams.PriorPrecision(model, per="layer", init=1.3).to(DT)
    x, y = torch.randn(7, 16, dtype=DT), torch.randint(0, 3, (7,))
    vals = []
    for kernel in ("layerwise", "dense"):
        torch.manual_seed(5)
        vals.append(hg.log_evidence(model, x, y, prior, augmentation=aug, samples=3, kernel=kernel))
    torch.testing.assert_close(vals[0], vals[1], rtol=1e-13, atol=1e-13)


# ----------------------------------------------------------------------------- marglik: closed forms


class _FrozenUnused(nn.Module):
    """A frozen feature layer, a trained head and a trained but unused layer."""

    def __init__(self) -> None:
        super().__init__()
        self.feat, self.head, self.unused = nn.Linear(3, 5), nn.Linear(5, 2), nn.Linear(2, 2)
        self.feat.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.feat(x)))


@pytest.mark.parametrize("model_dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("per", ["global", "layer", "parameter"])
def test_multi_output_regression_with_frozen_and_unused_weights_is_bayesian_linear_regression(
    per: str, model_dtype: torch.dtype
) -> None:
    """The evidence of the head (a linear model on frozen features) and its gradient w.r.t.
    float64 precisions and noise: per output c, y_c ~ N(f_c, sigma^2 I + Phi D_c^-1 Phi' +
    1/d_b), the unused layer adding its prior term only."""
    torch.manual_seed(0)
    model = _FrozenUnused().to(model_dtype)
    prior = hg.hparams.PriorPrecision(model, per=per, init=2.0).to(DT)
    with torch.no_grad():
        for r in prior.raw:
            r.add_(0.3 * torch.randn_like(r))
    noise = hg.hparams.ObservationNoise(0.7, dtype=DT)
    n = 20
    x, y = torch.randn(n, 3, dtype=model_dtype), torch.randn(n, 2, dtype=model_dtype)
    hps = [*prior.parameters(), *noise.parameters()]
    raws = [t.detach().clone().requires_grad_(True) for t in hps]
    th = {k: p.detach().double() for k, p in model.named_parameters() if p.requires_grad}
    phi = torch.tanh(F.linear(x.double(), model.feat.weight.double(), model.feat.bias.double()))
    f = F.linear(phi, th["head.weight"], th["head.bias"])
    sigma = raws[-1].exp()
    prec = {k: raws[prior._index[k]].exp() for k in prior.names}
    quad = sum((prec[k] * th[k] ** 2).sum() for k in prior.names)
    dw = prec["head.weight"] * torch.ones(2, 5, dtype=DT)
    db = prec["head.bias"] * torch.ones(2, dtype=DT)
    ref = -0.5 * quad
    for c in range(2):
        k = (phi / dw[c]) @ phi.T + 1 / db[c]
        r = (y.double()[:, c] - f[:, c]) / sigma
        ref = ref - 0.5 * r.square().sum() - n * (sigma.log() + 0.5 * math.log(2 * math.pi))
        ref = ref - 0.5 * torch.logdet(torch.eye(n, dtype=DT) + k / sigma**2)
    ref_grads = torch.autograd.grad(ref, raws)
    tol = 1e-12 if model_dtype == torch.float64 else 2e-6
    for kernel, form in (("auto", "ntk"), ("dense", "ntk"), ("auto", "parametric")):
        ev = hg.log_evidence(
            model, x, y, prior, likelihood="regression", noise=noise, form=form, kernel=kernel
        )
        grads = torch.autograd.grad(ev, hps)
        assert float(ev.detach()) == pytest.approx(float(ref.detach()), rel=tol)
        for g, gr in zip(grads, ref_grads, strict=True):
            assert g.dtype == DT
            torch.testing.assert_close(g, gr, rtol=tol, atol=tol * float(gr.abs().max()))
        assert float(grads[-1].abs()) > 1.0


def test_through_map_with_frozen_unused_weights_and_learned_noise_is_the_total_derivative() -> None:
    """Regression, a frozen first layer and an unused parameter: the through-MAP hypergradient of
    every precision and the noise against central differences around MAPs solved to 1e-15."""
    from hypergrad._unrolled import _load_forward_ad

    _load_forward_ad()  # torch.func.hessian below: torch warns once when forward AD loads

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.feat, self.mid, self.head = nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(3, 2)
            self.unused = nn.Parameter(torch.randn(3))
            self.feat.requires_grad_(False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.mid(torch.tanh(self.feat(x)))))

    torch.manual_seed(0)
    model = Net().to(DT)
    n = 12
    x, y = torch.randn(n, 3, dtype=DT), torch.randn(n, 2, dtype=DT)
    params = dict(model.named_parameters())
    names = [k for k, p in params.items() if p.requires_grad]
    shapes = [params[k].shape for k in names]
    start = torch.cat([params[k].detach().reshape(-1) for k in names])

    def unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            k: c.reshape(s)
            for k, c, s in zip(names, v.split([s.numel() for s in shapes]), shapes, strict=True)
        }

    def fit(raw: list[float]) -> nn.ModuleDict:
        hp = nn.ModuleDict(
            {
                "prior": hg.hparams.PriorPrecision(model, per="layer").to(DT),
                "noise": hg.hparams.ObservationNoise(1.0, dtype=DT),
            }
        )
        with torch.no_grad():
            for p, r in zip(hp.parameters(), raw, strict=True):
                p.fill_(r)
        prec = {k: v.detach() for k, v in hp["prior"].precisions().items()}
        sig = hp["noise"]().detach()

        def objective(v: torch.Tensor) -> torch.Tensor:
            w = unflat(v)
            f = torch.func.functional_call(model, w, (x,))
            nll = (0.5 * ((y - f) / sig) ** 2).sum() / n + 2 * torch.log(sig)
            return nll + 0.5 * sum((prec[k] * w[k].square()).sum() for k in names) / n

        v = start.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([v], max_iter=500, tolerance_grad=1e-13, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = objective(v)
            value.backward()
            return value

        opt.step(closure)
        v = v.detach()
        for _ in range(4):  # Newton to the last digit
            v = v - torch.linalg.solve(torch.func.hessian(objective)(v), torch.func.grad(objective)(v))
        assert float(torch.func.grad(objective)(v).norm()) < 1e-13
        with torch.no_grad():
            for k in names:
                params[k].copy_(unflat(v)[k])
        return hp

    def outer(raw: list[float]) -> float:
        hp = fit(raw)
        bound = hg.log_evidence_bound(
            model, x, y, hp["prior"], data_size=n, subset_size=4, likelihood="regression", noise=hp["noise"]
        )
        return -float(bound.detach()) / n

    raw0 = [0.2, -0.3, 0.1, -0.4]  # unused (the model's own layer ""), mid, head, log sigma
    hp = fit(raw0)
    kw: dict[str, Any] = {"likelihood": "regression", "data_size": n, "subset_size": 4}
    opts = {
        "inner_optimizer": torch.optim.SGD(model.parameters(), lr=0.0),
        "outer_optimizer": torch.optim.SGD(hp.parameters(), lr=0.0),
    }
    total, info = hg.MarginalLikelihood(
        model, hp, through_map=True, solver=hg.CG(maxiter=200, tol=1e-14, damping=0.0), **kw, **opts
    ).hypergradient(train_batch=(x, y))
    fixed, _ = hg.MarginalLikelihood(model, hp, **kw, **opts).hypergradient(train_batch=(x, y))
    assert info.solver_status == "converged"
    eps = 1e-5
    for i in range(4):
        up, down = list(raw0), list(raw0)
        up[i] += eps
        down[i] -= eps
        fd = (outer(up) - outer(down)) / (2 * eps)
        assert float(total[i]) == pytest.approx(fd, rel=1e-7, abs=1e-10)
        if i > 0:
            assert abs(float(fixed[i]) - fd) > 0.1 * abs(fd)  # the fixed-weights partial is not it
    assert float(total[0]) == 0.0  # the unused weight's MAP is 0: its precision has no gradient
