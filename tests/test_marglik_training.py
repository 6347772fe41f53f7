"""``hg.MarginalLikelihood`` as a training loop, checked against laplace-torch's online loop.

laplace-torch's ``marglik_training`` (Immer et al. 2021, Algorithm 1) alternates MAP epochs on the
weights with, every ``marglik_frequency`` epochs after ``n_epochs_burnin``, a "full" GGN Laplace
fit on the whole data and ``n_hypersteps`` Adam steps on the log prior precision (and log sigma)
through its evidence. Here that loop is written out by hand around laplace-torch's
``Laplace(...).log_marginal_likelihood`` and run in lockstep with ``MarginalLikelihood``
(``bound="exact"``, the whole data as one batch, ``burn_in``/``every``/``outer_steps``): evidence,
its gradient, weights and hyperparameters agree at every epoch (float64). Then the schedule, the
all-or-nothing ``outer_steps``, resuming mid-run and Dropout, against hand-written loops.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64
N = 16


def _problem(likelihood: str, bias: bool = True) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    c = 1 if likelihood == "regression" else 3
    model = nn.Sequential(nn.Linear(2, 6, bias=bias), nn.Tanh(), nn.Linear(6, c, bias=bias)).to(DT)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 2, generator=g, dtype=DT)
    if likelihood == "regression":
        y = torch.sin(2 * x[:, :1]) + 0.3 * torch.randn(N, 1, generator=g, dtype=DT)
    else:
        y = torch.randint(0, c, (N,), generator=g)
    return model, x, y


def _laplace_fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, likelihood: str) -> Any:
    from laplace import Laplace
    from laplace.curvature import CurvlinopsGGN

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    default = torch.get_default_dtype()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # laplace-torch's and curvlinops' own warnings
        torch.set_default_dtype(DT)  # curvlinops makes some tensors in the default dtype
        try:
            la = Laplace(
                model, likelihood, subset_of_weights="all", hessian_structure="full", backend=CurvlinopsGGN
            )
            la.fit(loader)
        finally:
            torch.set_default_dtype(default)
    return la


@pytest.mark.parametrize(
    "likelihood, per",
    [
        ("classification", "global"),
        ("classification", "layer"),
        ("classification", "parameter"),
        ("regression", "global"),
        ("regression", "layer"),
        ("regression", "parameter"),
    ],
)
def test_online_loop_moves_weights_and_hyperparameters_as_laplace_torch_marglik_training(
    likelihood: str, per: str
) -> None:
    pytest.importorskip("laplace")
    # laplace-torch's 'layerwise' is one precision per parameter tensor, hypergrad's 'layer' one per
    # module: without biases they are the same structure
    model, x, y = _problem(likelihood, bias=per != "layer")
    ref = copy.deepcopy(model)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per=per, init=0.7)})
    if likelihood == "regression":
        hp["noise"] = hg.hparams.ObservationNoise(0.8)
    hp = hp.to(DT)
    burn_in, every, k = 2, 2, 3
    hopt = hg.MarginalLikelihood(
        model, hp, likelihood=likelihood, data_size=N, bound="exact", burn_in=burn_in, every=every,
        outer_steps=k, inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
        # hypergrad ascends the evidence per datum, laplace-torch the evidence: Adam is invariant
        # to that scale but for eps, so eps / N makes the two updates the same numbers
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1, eps=1e-8 / N),
    )  # fmt: skip
    # laplace-torch's hyperparameters: log precisions shaped (1,) scalar, (H,) layerwise, (P,) diagonal
    # (hypergrad's raw is log delta: one 0-dim tensor globally or per layer, one per weight tensor)
    prior = hp["prior"]
    log_prec = torch.cat([r.detach().reshape(-1) for r in prior.raw]).clone().requires_grad_(True)
    sizes = [p.numel() for p in ref.parameters()]

    def delta() -> torch.Tensor:  # laplace-torch's prior_precision_diag, (P,)
        d = log_prec.detach().exp()
        if per == "global":
            return d.expand(sum(sizes))
        if per == "layer":
            return d.repeat_interleave(torch.tensor(sizes))
        return d

    diag = torch.cat(
        [
            v.expand_as(p).reshape(-1)
            for v, p in zip(prior.precisions().values(), model.parameters(), strict=True)
        ]
    )
    assert torch.equal(delta(), diag)
    hyper = [log_prec]
    if likelihood == "regression":
        log_sigma = hp["noise"].raw.detach().clone().reshape(1).requires_grad_(True)
        hyper.append(log_sigma)
    ref_outer = torch.optim.Adam(hyper, lr=0.1)
    ref_inner = torch.optim.SGD(ref.parameters(), lr=0.2)

    def ours_flat() -> list[torch.Tensor]:
        flat = [torch.cat([r.detach().reshape(-1) for r in prior.raw])]
        return flat + ([hp["noise"].raw.detach().reshape(1)] if likelihood == "regression" else [])

    rounds = 0
    for epoch in range(1, 9):
        hopt.step((x, y))
        ref_inner.zero_grad()  # laplace-torch's MAP step: mean NLL + theta^T P0 theta / (2N)
        f = ref(x)
        theta = torch.cat([p.reshape(-1) for p in ref.parameters()])
        if likelihood == "regression":
            # as a Gaussian NLL (laplace-torch's MSE + sigma^2 theta^T P0 theta / N has the same
            # minimiser but 2 sigma^2 times the gradient: another SGD path)
            s = log_sigma.detach().exp()
            nll = (y - f).square().sum() / (2 * s**2) / N + s.log()
        else:
            nll = F.cross_entropy(f, y)
        (nll + 0.5 * (delta() * theta) @ theta / N).backward()
        ref_inner.step()
        due = epoch % every == 0 and epoch >= burn_in  # marglik_frequency, n_epochs_burnin
        assert hopt.hyper_step_due() == due
        if due:
            rounds += 1
            la = _laplace_fit(ref, x, y, likelihood)
            for j in range(k):  # n_hypersteps on one fit
                ref_outer.zero_grad()
                sigma = log_sigma.exp() if likelihood == "regression" else None
                evidence = la.log_marginal_likelihood(log_prec.exp(), sigma)
                (-evidence).backward()
                if j == 0:
                    grads, info = hopt.hypergradient(train_batch=(x, y))
                    assert -info.outer_loss * N == pytest.approx(float(evidence.detach()), rel=1e-11)
                    ours = [torch.cat([g.reshape(-1) for g in grads[: len(prior.raw)]])]
                    ours += [g.reshape(1) for g in grads[len(prior.raw) :]]
                    for a, b in zip(ours, hyper, strict=True):
                        torch.testing.assert_close(a * N, b.grad, rtol=1e-9, atol=1e-11)
                ref_outer.step()
            info = hopt.hyper_step(train_batch=(x, y))
            assert info.hyper_steps == rounds and not info.skipped
        for a, b in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        for a, b in zip(ours_flat(), [h.detach() for h in hyper], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    assert rounds == 4
    start = [0.7] * 2 + ([0.8] if likelihood == "regression" else [])
    assert any(
        abs(float(h.detach().exp().mean()) - s) > 0.05 for h, s in zip(hyper, start, strict=False)
    )  # it moved


def _classifier(dropout: float = 0.0, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(2, 6), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    model = nn.Sequential(*layers, nn.Linear(6, 3)).to(DT)
    hp = nn.ModuleDict({"prior": hg.hparams.PriorPrecision(model, per="layer")}).to(DT)
    return model, hp


def _hopt(model: nn.Module, hp: nn.Module, lr: float = 0.1, **kw: Any) -> hg.MarginalLikelihood:
    return hg.MarginalLikelihood(
        model, hp, likelihood="classification", data_size=kw.pop("data_size", N),
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=lr), **kw,
    )  # fmt: skip


def test_schedule_counts_accepted_steps_and_a_refused_step_brings_no_second_hyperstep() -> None:
    _, x, y = _problem("classification")
    bad_x = x.clone()
    bad_x[0, 0] = float("nan")
    model, hp = _classifier()
    hopt = _hopt(model, hp, burn_in=3, every=2, on_nonfinite="skip", subset_size=4)
    accepted, taken = 0, []
    for i in range(14):
        refused = i in (5, 6, 9)  # right after hypersteps (5 accepted steps; 7) and between them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hg.NonFiniteWarning)
            hopt.step((bad_x if refused else x, y))
        accepted += not refused
        assert hopt.inner_steps == accepted
        # a hand-written loop over accepted steps, one hyperstep per count at most
        due = accepted >= 3 and (accepted - 3) % 2 == 0 and accepted not in taken
        assert hopt.hyper_step_due() == due, (i, accepted)
        if due:
            hopt.hyper_step(train_batch=(x, y))
            taken.append(accepted)
            assert not hopt.hyper_step_due()  # asked again at the same count
    assert taken == [3, 5, 7, 9, 11]
    with pytest.raises(ValueError, match="data_size"):
        hopt.hyper_step(train_batch=(torch.cat([x, x]), torch.cat([y, y])))  # more than data_size


def test_outer_steps_are_k_adam_steps_on_one_bound_and_all_or_nothing_when_one_fails() -> None:
    _, x, y = _problem("classification")
    model, hp = _classifier()
    hopt = _hopt(model, hp, outer_steps=3, bound="exact")
    hopt.step((x, y))
    hand_hp = copy.deepcopy(hp)
    hand = _hopt(model, hand_hp, bound="exact")  # the same bound, three single steps by hand
    first = None
    for j in range(3):
        hand.hyper_step(train_batch=(x, y))
        first = [p.grad.clone() for p in hand_hp.parameters()] if j == 0 else first
    info = hopt.hyper_step(train_batch=(x, y))
    assert info.hyper_steps == 1 and hopt.hyper_steps == 1
    for a, b in zip(hp.parameters(), hand_hp.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    assert first is not None
    for a, g in zip(hp.parameters(), first, strict=True):
        torch.testing.assert_close(a.grad, g, rtol=0, atol=1e-14)  # .grad: where the call began
    # a huge outer step: the first is finite, the second meets an infinite precision
    for mode in ("raise", "skip"):
        hopt = _hopt(model, hp, outer_steps=3, bound="exact", on_nonfinite=mode)
        hopt.hyper_step(train_batch=(x, y))  # Adam's moments and step count
        hopt.outer_optimizer.param_groups[0]["lr"] = 800.0
        values = [p.detach().clone() for p in hp.parameters()]
        grads = [p.grad.clone() for p in hp.parameters()]
        adam = copy.deepcopy(hopt.outer_optimizer.state_dict())
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if mode == "raise":
                with pytest.raises(hg.NonFiniteError, match="not finite"):
                    hopt.hyper_step(train_batch=(x, y))
            else:
                assert hopt.hyper_step(train_batch=(x, y)).skipped
        assert mode == "raise" or any(issubclass(w.category, hg.NonFiniteWarning) for w in seen)
        assert hopt.hyper_steps == 1
        assert all(torch.equal(a, b) for a, b in zip(values, hp.parameters(), strict=True))
        assert all(torch.equal(a.grad, b) for a, b in zip(hp.parameters(), grads, strict=True))
        now = hopt.outer_optimizer.state_dict()["state"]
        for i, st in adam["state"].items():
            assert all(torch.equal(st[key], now[i][key]) for key in st)


def test_hyper_step_under_inference_mode_leaves_the_outer_optimiser_usable() -> None:
    _, x, y = _problem("classification")
    model, hp = _classifier()
    hopt = _hopt(model, hp, outer_steps=2, subset_size=4)
    hopt.step((x, y))
    hopt.hyper_step(train_batch=(x, y))  # Adam has moments now
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        hopt.hyper_step(train_batch=(x, y))
    # the refused call must not have put inference tensors into Adam's state
    assert not any(t.is_inference() for st in hopt.outer_optimizer.state.values() for t in st.values())
    assert hopt.hyper_step(train_batch=(x, y)).hyper_steps == 2


def _run(
    hopt: hg.MarginalLikelihood, model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: range
) -> None:
    for _ in steps:
        idx = torch.randperm(N)[:8]  # torch's RNG: restored by load_state_dict
        model.train()
        hopt.step((x[idx], y[idx]))  # with dropout
        if hopt.hyper_step_due():
            model.eval()
            hopt.hyper_step(train_batch=(x[idx], y[idx]))


def test_resume_mid_run_continues_bit_for_bit_with_dropout_and_sampled_outputs() -> None:
    _, x, y = _problem("classification")

    def build() -> tuple[nn.Module, nn.Module, hg.MarginalLikelihood]:
        model, hp = _classifier(dropout=0.3)
        kw = {"subset_size": 4, "outputs": "sampled", "burn_in": 1, "every": 2, "outer_steps": 2}
        return model, hp, _hopt(model, hp, **kw)

    m1, hp1, h1 = build()
    _run(h1, m1, x, y, range(9))
    m2, hp2, h2 = build()
    _run(h2, m2, x, y, range(5))  # a hyperstep at 5: save before the 6th step
    assert h2.inner_steps == 5 and not h2.hyper_step_due()
    saved = copy.deepcopy(h2.state_dict())
    torch.manual_seed(99)
    m3, hp3, h3 = build()
    h3.load_state_dict(saved)
    assert not h3.hyper_step_due()  # as the straight run: the hyperstep at 5 was taken
    _run(h3, m3, x, y, range(5, 9))
    assert (h3.inner_steps, h3.hyper_steps) == (h1.inner_steps, h1.hyper_steps) == (9, 5)
    for a, b in zip(
        [*m1.parameters(), *hp1.parameters()], [*m3.parameters(), *hp3.parameters()], strict=True
    ):
        assert torch.equal(a, b)


def test_dropout_trains_in_step_and_is_refused_in_train_mode_at_hyper_step_changing_nothing() -> None:
    _, x, y = _problem("classification")
    model, hp = _classifier(dropout=0.5)
    for k in (1, 3):
        hopt = _hopt(model, hp, outer_steps=k, subset_size=4)
        model.eval()
        hopt.step((x, y))
        hopt.hyper_step(train_batch=(x, y))
        assert not model.training  # hyper_step keeps the mode it is given
        model.train()
        torch.manual_seed(0)
        a = hopt.step((x, y))
        torch.manual_seed(1)
        b = hopt.step((x, y))
        assert float(a) != float(b)  # dropout is on in step: two masks, two losses
        values = [p.detach().clone() for p in hp.parameters()]
        grads = [p.grad.clone() for p in hp.parameters()]
        steps = hopt.hyper_steps
        with pytest.raises(ValueError, match=r"model\.2 is Dropout in training mode"):
            hopt.hyper_step(train_batch=(x, y))
        assert hopt.hyper_steps == steps and model.training
        assert all(torch.equal(a, b) for a, b in zip(values, hp.parameters(), strict=True))
        assert all(torch.equal(a.grad, b) for a, b in zip(hp.parameters(), grads, strict=True))
        model.eval()
        torch.manual_seed(0)
        before = hopt.hypergradient(train_batch=(x, y))
        torch.manual_seed(1)
        again = hopt.hypergradient(train_batch=(x, y))  # eval mode: no mask drawn
        assert before[1].outer_loss == again[1].outer_loss
        assert all(torch.equal(a, b) for a, b in zip(before[0], again[0], strict=True))
        assert hopt.hyper_step(train_batch=(x, y)).hyper_steps == steps + 1


def test_a_singular_kernel_is_a_refused_nonfinite_hyperstep(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that is no longer positive definite in floating point (torch raises LinAlgError
    from a Cholesky, e.g. at an overflowing precision) is a non-finite bound: the hyperstep is
    refused by the guard, nothing changes, instead of a raw LinAlgError escaping."""
    import hypergrad._marglik as ml

    _, x, y = _problem("classification")
    model, hp = _classifier()

    def singular(*args: object, **kwargs: object) -> None:
        raise torch.linalg.LinAlgError("cholesky: the input matrix is singular")

    for mode in ("raise", "skip"):
        hopt = _hopt(model, hp, bound="exact", on_nonfinite=mode)
        hopt.step((x, y))
        values = [p.detach().clone() for p in hp.parameters()]
        with monkeypatch.context() as mp:
            mp.setattr(ml, "_terms", singular)
            if mode == "raise":
                with pytest.raises(hg.NonFiniteError, match="not finite"):
                    hopt.hyper_step(train_batch=(x, y))
            else:
                with pytest.warns(hg.NonFiniteWarning):
                    assert hopt.hyper_step(train_batch=(x, y)).skipped
        assert all(torch.equal(a, b) for a, b in zip(values, hp.parameters(), strict=True))
