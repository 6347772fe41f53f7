"""Hardening of the newer families (SelfTuning, BestResponse, MarginalLikelihood, hg.nn): what a
demanding user hits off the happy path. Each test names the failure a user saw before the fix."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64


def _batch(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- SelfTuning


class BNStn(nn.Module):
    """An STN MLP with a BatchNorm between its layers."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.l1 = hg.nn.StnLinear(4, 8, n)
        self.bn = nn.BatchNorm1d(8)
        self.l2 = hg.nn.StnLinear(8, 3, n)

    def forward(self, x: torch.Tensor, hp: Any) -> torch.Tensor:
        d = hp.draw(len(x))
        return self.l2(torch.tanh(self.bn(self.l1(x, d))), d)


def _stn_loss(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0], h), b[1])


def _bn_stn(seed: int = 0, **kw: Any) -> hg.SelfTuning:
    torch.manual_seed(seed)
    hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.3, high=0.9), dtype=DT)
    model = BNStn(hp.size).to(DT)
    with torch.no_grad():
        for layer in (model.l1, model.l2):
            layer.hnet.normal_(0, 0.5)
    return hg.SelfTuning(
        model,
        hp,
        _stn_loss,
        _stn_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        **kw,
    )


@pytest.mark.parametrize("linearize", [True, False], ids=["linearised", "centred"])
def test_delta_stn_updates_batchnorm_running_stats_once_per_step(linearize: bool) -> None:
    """Before: Delta-STN's two passes (base and response) both updated the running statistics,
    so num_batches_tracked counted 2 per step and the running mean moved twice as fast."""
    hopt = _bn_stn(delta=True, linearize=linearize)
    model = hopt.model
    assert isinstance(model, BNStn)
    reference = copy.deepcopy(model)  # one ordinary forward at the current lambda (Delta = 0)
    x, y = _batch(0)
    reference(x, hopt.hparams)
    hopt.step((x, y))
    assert int(model.bn.num_batches_tracked) == 1
    torch.testing.assert_close(model.bn.running_mean, reference.bn.running_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model.bn.running_var, reference.bn.running_var, rtol=1e-12, atol=1e-14)
    assert float((model.bn.running_mean).abs().max()) > 1e-3  # the statistics did move
    hopt.hyper_step(val_batch=_batch(1))  # the validation pass (eval mode) leaves them alone
    assert int(model.bn.num_batches_tracked) == 1
    torch.testing.assert_close(model.bn.running_mean, reference.bn.running_mean, rtol=1e-12, atol=1e-14)


def _run_stn(hopt: hg.HyperOptimizer, start: int, stop: int) -> None:
    for i in range(start, stop):
        hopt.step(_batch(i))
        if i % 2 == 1:
            hopt.hyper_step(val_batch=_batch(100 + i))


@pytest.mark.parametrize("delta", [False, True], ids=["stn", "delta-stn"])
def test_selftuning_with_batchnorm_resumes_bit_exactly_into_a_fresh_object(delta: bool) -> None:
    straight = _bn_stn(delta=delta)
    _run_stn(straight, 0, 8)
    first = _bn_stn(delta=delta)
    _run_stn(first, 0, 5)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    resumed = _bn_stn(seed=7, delta=delta)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    _run_stn(resumed, 5, 8)
    assert _same_state(straight.model.state_dict(), resumed.model.state_dict())
    assert _same_state(straight.hparams.state_dict(), resumed.hparams.state_dict())
    assert resumed.hparams.history() == straight.hparams.history() and len(straight.hparams.history()) == 4


def test_selftuning_refuses_a_state_of_another_configuration() -> None:
    """Before: a state saved with other specs (Positive read as a Rate) or with delta=False loaded
    into delta=True silently, reinterpreting the raw values or the network's inputs."""
    src = _bn_stn()
    _run_stn(src, 0, 2)
    state = src.state_dict()
    other = _bn_stn(delta=True)
    before = copy.deepcopy(other.model.state_dict())
    with pytest.raises(ValueError, match="delta"):
        other.load_state_dict(state)
    assert _same_state(before, other.model.state_dict())  # atomic: nothing was loaded
    torch.manual_seed(0)
    hp = hg.hparams.SelfTuned(p=hg.hparams.Positive(0.3), dtype=DT)  # same size, another meaning
    model = BNStn(hp.size).to(DT)
    wrong = hg.SelfTuning(
        model,
        hp,
        _stn_loss,
        _stn_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
    )
    raw = hp.raw.detach().clone()
    with pytest.raises(ValueError, match=r"Rate.*Positive|Positive.*Rate"):
        wrong.load_state_dict(state)
    assert torch.equal(hp.raw, raw)
    same = _bn_stn(seed=3)  # the same configuration (other initial values) loads fine
    same.load_state_dict(state)
    assert torch.equal(same.hparams.raw, src.hparams.raw)


def test_an_untrained_response_map_is_named_at_the_first_step() -> None:
    """Before: an inner optimiser without the layers' response maps (hnet) or the hypernetwork's
    response trained everything else, and the hypersteps followed the random initial map."""
    hopt = _bn_stn()
    model = hopt.model
    hopt.inner_optimizer = torch.optim.SGD(
        [p for n, p in model.named_parameters() if "hnet" not in n], lr=0.1
    )
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"does not train \['l1.hnet', 'l2.hnet'\]"):
        hopt.step(_batch(0))
    assert _same_state(before, model.state_dict()) and hopt.inner_steps == 0
    for layer in (model.l1, model.l2):  # frozen on purpose: fine
        assert isinstance(layer, hg.nn.StnLinear)
        layer.hnet.requires_grad_(False)
    hopt.step(_batch(0))
    assert hopt.inner_steps == 1
    br, net = _hypernet_problem(_linear_base)
    br.inner_optimizer = torch.optim.SGD([net.base_weights], lr=0.1)
    with pytest.raises(ValueError, match=r"does not train \['q'\]"):
        br.step(_batch(0))


# ----------------------------------------------------------------------------- BestResponse


def _hypernet_problem(
    make_base: Callable[[], nn.Module], sampling: str = "local", seed: int = 0
) -> tuple[hg.BestResponse, hg.nn.HyperNet]:
    torch.manual_seed(seed)
    base = make_base()
    hp = hg.hparams.SelfTuned(decay=hg.hparams.Positive(0.01, transform="exp"), learn_scale=False, dtype=DT)
    net = hg.nn.HyperNet(base, hp.size)

    def val(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0], hparams=h), b[1])

    def train(m: nn.Module, h: nn.Module, b: Any) -> torch.Tensor:
        w = m.weights(h)  # type: ignore[operator]
        return val(m, h, b) + h.draw(1)["decay"][0] * sum((t**2).sum() for t in w.values())  # type: ignore[operator]

    hopt = hg.BestResponse(
        net,
        hp,
        train,
        val,
        inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        sampling=sampling,
    )
    return hopt, net


def _linear_base() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3)).to(DT)


def _bn_base() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).to(
        DT
    )


def test_hypernet_base_batchnorm_and_dropout_follow_the_hypernet() -> None:
    """Before: the base model was not a submodule, so net.eval() left its Dropout active (a random
    hypergradient), the validation passes updated its BatchNorm statistics, and state_dict()
    held none of them (no exact resume)."""
    hopt, net = _hypernet_problem(_bn_base)
    bn_keys = {"base_state.1.running_mean", "base_state.1.running_var", "base_state.1.num_batches_tracked"}
    assert bn_keys <= set(net.state_dict())
    hopt.step(_batch(0))
    stats = copy.deepcopy(net.state_dict())
    assert int(stats["base_state.1.num_batches_tracked"]) == 1
    g1, _ = hopt.hypergradient(val_batch=_batch(1))
    g2, _ = hopt.hypergradient(val_batch=_batch(1))
    assert torch.equal(g1[0], g2[0]) and float(g1[0].abs().max()) > 0  # eval mode: deterministic
    hopt.hyper_step(val_batch=_batch(1))
    assert _same_state(stats, net.state_dict())  # no statistics moved by the validation passes
    assert net.training and all(m.training for m in net.base.modules())  # train mode restored
    net.eval()
    assert not any(m.training for m in net.base.modules())
    x = _batch(2)[0]
    out = net(x, hparams=hopt.hparams)
    assert torch.equal(out, net(x, hparams=hopt.hparams))  # no dropout in eval mode
    net.train()
    # the buffers move with the hypernetwork
    net32 = copy.deepcopy(net).float()
    assert net32.base_state.get_buffer("1.running_mean").dtype == torch.float32
    assert net32(x.float(), hparams=torch.zeros(1)).dtype == torch.float32


def test_best_response_with_batchnorm_resumes_bit_exactly() -> None:
    def run(hopt: hg.BestResponse, start: int, stop: int) -> None:
        for i in range(start, stop):
            hopt.step(_batch(i))
            hopt.hyper_step(val_batch=_batch(50 + i))

    straight, _ = _hypernet_problem(_bn_base)
    run(straight, 0, 6)
    first, _ = _hypernet_problem(_bn_base)
    run(first, 0, 3)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    resumed, _ = _hypernet_problem(_bn_base, seed=5)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    run(resumed, 3, 6)
    assert _same_state(straight.model.state_dict(), resumed.model.state_dict())
    assert _same_state(straight.hparams.state_dict(), resumed.hparams.state_dict())


class SharedBase(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        block = nn.Linear(4, 4)
        self.body = nn.Sequential(block, nn.Tanh(), block)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_hypernet_over_a_base_reusing_a_submodule_leaves_the_template_intact() -> None:
    """Before: torch.func.functional_call left plain tensors (holding the last call's graph) in
    the reused block of the template."""
    torch.manual_seed(0)
    base = SharedBase().to(DT)
    params = dict(base.named_parameters(remove_duplicate=False))
    net = hg.nn.HyperNet(base, 1)
    x = _batch(0)[0]
    lam = torch.tensor([0.3], dtype=DT, requires_grad=True)
    out = net(x, hparams=lam)
    for n, p in base.named_parameters(remove_duplicate=False):
        assert p is params[n] and isinstance(p, nn.Parameter), n
    w = net.weights(lam)  # the same function, written out by hand
    blk = lambda h: F.linear(h, w["body.0.weight"], w["body.0.bias"])  # noqa: E731
    expected = F.linear(blk(torch.tanh(blk(x))), w["head.weight"], w["head.bias"])
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)


def test_best_response_refuses_a_state_saved_with_another_sampling() -> None:
    """Before: a state saved with sampling='local' loaded into a 'global' BestResponse replaced
    its prior by None, which silently switched it to local sampling."""
    local, _ = _hypernet_problem(_linear_base)
    local.step(_batch(0))
    glob, _ = _hypernet_problem(_linear_base, sampling="global")
    prior = glob.hparams._prior
    assert prior is not None
    with pytest.raises(ValueError, match="sampling"):
        glob.load_state_dict(local.state_dict())
    kept = glob.hparams._prior
    assert kept is not None and all(torch.equal(a, b) for a, b in zip(kept, prior, strict=True))
    with pytest.raises(ValueError, match="sampling"):
        local.load_state_dict(glob.state_dict())


# ----------------------------------------------------------------------------- MarginalLikelihood


def _marglik(
    model: nn.Module, likelihood: str = "classification", *, data_size: int = 100, **kw: Any
) -> hg.MarginalLikelihood:
    parts: dict[str, nn.Module] = {"prior": hg.hparams.PriorPrecision(model, per="layer")}
    if likelihood == "regression":
        parts["noise"] = hg.hparams.ObservationNoise(0.5)
    hp = nn.ModuleDict(parts).to(DT)
    return hg.MarginalLikelihood(
        model,
        hp,
        likelihood=likelihood,
        data_size=data_size,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
        **kw,
    )


@pytest.mark.parametrize("through_map", [False, True], ids=["fixed-weights", "through-map"])
def test_marglik_on_a_model_reusing_a_submodule_keeps_its_parameters(through_map: bool) -> None:
    """Before: the dense Jacobians (torch.func.functional_call) left plain tensors in the reused
    block: the model stopped using the Parameters the optimiser trains, so training silently
    stopped changing it."""
    torch.manual_seed(0)
    model = SharedBase().to(DT)
    params = dict(model.named_parameters(remove_duplicate=False))
    hopt = _marglik(model, through_map=through_map)
    b = _batch(0)
    hopt.step(b)
    hopt.hyper_step(train_batch=b)
    for n, p in model.named_parameters(remove_duplicate=False):
        assert p is params[n] and isinstance(p, nn.Parameter), n
    before = model(b[0]).detach()
    hopt.step(b)  # the step still trains the model the user holds
    assert float((model(b[0]).detach() - before).abs().max()) > 1e-4
    # the evidence is that of the same network written out by hand (the block's weights counted
    # in both places it acts)
    x, y = b
    prec = hopt.prior.precisions()
    theta = {n: p.detach() for n, p in model.named_parameters()}

    def f(t: dict[str, torch.Tensor]) -> torch.Tensor:
        blk = lambda h: F.linear(h, t["body.0.weight"], t["body.0.bias"])  # noqa: E731
        return F.linear(blk(torch.tanh(blk(x))), t["head.weight"], t["head.bias"])

    jac = torch.func.jacrev(f)(theta)  # (B, C, *shape) per name
    out = f(theta)
    k = sum(j.reshape(16 * 3, -1) @ j.reshape(16 * 3, -1).T / prec[n] for n, j in jac.items())
    probs = torch.softmax(out, 1)
    lam = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in probs])
    logdet = torch.linalg.slogdet(torch.eye(48, dtype=DT) + k @ lam)[1]  # type: ignore[operator]
    quad = sum((prec[n] * t**2).sum() for n, t in theta.items())
    expected = -F.cross_entropy(out, y, reduction="sum") - 0.5 * quad - 0.5 * logdet
    with torch.no_grad():
        torch.testing.assert_close(hg.log_evidence(model, x, y, hopt.prior), expected, rtol=1e-10, atol=1e-10)
    for n, p in model.named_parameters(remove_duplicate=False):
        assert p is params[n], n


def _mlp(seed: int = 0, outputs: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, outputs)).to(DT)


def test_marglik_names_targets_that_do_not_fit_the_likelihood() -> None:
    """Before: float labels were truncated to integers (regression targets read as classes), a
    transposed regression target was silently reshaped, and one logit gave a constant softmax."""
    x, y = _batch(0)
    hopt = _marglik(_mlp())
    with pytest.raises(ValueError, match="integer class labels"):
        hopt.step((x, torch.randn(16, dtype=DT)))
    with pytest.raises(ValueError, match="integer class labels"):
        hopt.hyper_step(train_batch=(x, torch.randn(16, dtype=DT)))
    with pytest.raises(ValueError, match=r"labels \(B,\)"):
        hopt.step((x, F.one_hot(y, 3).to(DT)))
    assert hopt.inner_steps == 0
    hopt.step((x, y.to(DT)))  # whole numbers stored as floats are fine: the same as integer labels
    reference = _marglik(_mlp())
    reference.step((x, y))
    assert _same_state(hopt.model.state_dict(), reference.model.state_dict())
    with pytest.raises(ValueError, match="C >= 2"):
        _marglik(_mlp(outputs=1)).step((x, torch.zeros(16, dtype=torch.long)))
    reg = _marglik(_mlp(), "regression")
    targets = torch.randn(16, 3, dtype=DT)
    with pytest.raises(ValueError, match=r"targets of shape \(3, 16\) do not match"):
        reg.step((x, targets.T.contiguous()))
    with pytest.raises(ValueError, match=r"targets of shape \(16,\) do not match"):
        reg.hyper_step(train_batch=(x, targets[:, 0]))
    reg.step((x, targets))
    single = _marglik(_mlp(outputs=1), "regression")  # (B,) targets for one output
    single.step((x, targets[:, 0]))
    assert single.hyper_step(train_batch=(x, targets[:, 0])).hyper_steps == 1
    # (B, T, C) logits with (B,) labels would be one T*C-way class per example: named instead
    seq = _marglik(nn.Sequential(_mlp(outputs=6), nn.Unflatten(1, (2, 3))))
    with pytest.raises(ValueError, match=r"logits of shape \(B, C\).*\(16, 2, 3\)"):
        seq.step((x, y))
    assert seq.inner_steps == 0


def test_marglik_refuses_a_batch_larger_than_the_data_set() -> None:
    """Before: data_size=10 with batches of 16 scaled the batch's evidence by 10/16 without a word."""
    hopt = _marglik(_mlp(), data_size=10)
    with pytest.raises(ValueError, match="16 examples but data_size=10"):
        hopt.hyper_step(train_batch=_batch(0))


def test_marglik_outer_steps_are_all_or_nothing_whatever_the_error() -> None:
    """Before: an error other than NonFiniteError in the k-th of outer_steps left the
    hyperparameters moved by k - 1 steps (and the counters and .grad of those steps)."""
    hopt = _marglik(_mlp(), outer_steps=3)
    b = _batch(0)
    hopt.step(b)
    hopt.hyper_step(train_batch=b)
    before = copy.deepcopy((hopt.hparams.state_dict(), hopt.outer_optimizer.state_dict()))
    grads = [p.grad.clone() for p in hopt.hparams.parameters()]  # type: ignore[union-attr]
    calls = []
    original = hopt._hypergradient

    def flaky(train_batch: Any, val_batch: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return original(train_batch, val_batch)

    hopt._hypergradient = flaky  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="out of memory"):
        hopt.hyper_step(train_batch=b)
    assert _same_state(before[0], hopt.hparams.state_dict()) and hopt.hyper_steps == 1
    assert hopt.outer_optimizer.state_dict()["state"][0]["step"] == before[1]["state"][0]["step"]
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, hopt.hparams.parameters(), strict=True))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- hg.nn helpers


def test_augmentation_helpers_name_non_finite_and_malformed_strengths() -> None:
    """Before: an infinite cutout size or shift overflowed to a negative int64 ("got min
    -9223372036854775808"), an infinite noise std was accepted (NaN losses later), and a 1-D
    input to random_shift failed deep inside torch.gather."""
    x = torch.ones(4, 6, dtype=DT)
    with pytest.raises(ValueError, match="finite"):
        hg.nn.cutout(x, float("inf"))
    with pytest.raises(ValueError, match="finite"):
        hg.nn.random_shift(x, torch.tensor([1.0, 2.0, float("inf"), 0.0]))
    with pytest.raises(ValueError, match="finite"):
        hg.nn.gaussian_noise(x, torch.tensor([0.1, float("inf"), 0.1, 0.1]))
    with pytest.raises(ValueError, match=r"\(B, \.\.\., L\)"):
        hg.nn.random_shift(torch.ones(4), 1)
    with pytest.raises(TypeError, match="bool"):
        hg.nn.cutout(x, True)
    with pytest.raises(TypeError, match="floating-point"):
        hg.nn.dropout(torch.ones(4, 6, dtype=torch.long), 0.5)
    images = torch.ones(3, 1, 6, 6, dtype=torch.uint8)  # integer images stay supported
    assert int((hg.nn.cutout(images, 2) == 0).sum()) <= 3 * 4
    shifted = hg.nn.random_shift(torch.arange(1, 7, dtype=torch.uint8).expand(3, 6), 0)
    assert torch.equal(shifted, torch.arange(1, 7, dtype=torch.uint8).expand(3, 6))
