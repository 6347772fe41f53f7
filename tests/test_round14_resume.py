"""Round 14: runs are saved and resumed exactly, in every family, as real scripts checkpoint.

Each family runs one flat loop of actions (an inner step, or a hyperstep when due); a run saved
after action ``k`` with ``torch.save(hopt.state_dict())``, read back with
``torch.load(weights_only=True)`` into objects built from *another* seed, and continued, must end
with the very state of the uninterrupted run (weights, hyperparameters, both optimisers, method
state, RNG) and must have produced the same losses and hypergradients on the way: dropout masks,
self-tuning perturbations and random translations are drawn from torch's generator, so any
state left only in memory shows up as a different draw. The cases are the ones earlier rounds
left out: Unrolled with ``checkpoint=True`` and in forward mode (a learned learning rate) saved
mid-window; SelfTuning(delta=True, val_steps=2) and BestResponse (local and global) saved inside
a validation phase; MarginalLikelihood through the MAP with a learned observation noise and a
RandomTranslation; ``hg.optim.AdamHD`` inside Implicit; a float16 GradScaler. One of them is
loaded by a new process. Then the loads that must be refused, clearly and without changing
anything.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import hypergrad as hg

# The builders are source text so that the new process of the subprocess test runs the very same
# code; this module executes it too.
_BUILDERS = r'''
import torch
from torch import nn
import hypergrad as hg

DT = torch.float64


def data(i, n=12, d=4, classes=3):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def ce(m, h, b):
    return nn.functional.cross_entropy(m(b[0]), b[1])


def mlp(dropout=0.2):
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(dropout), nn.Linear(6, 3)).to(DT)


def every(k):
    """A schedule: a hyperstep after every k-th inner step."""

    def due(hopt):
        return hopt.inner_steps > 0 and hopt.inner_steps % k == 0 and hopt.hyper_steps < hopt.inner_steps // k

    return due


def unrolled_checkpoint(seed):
    torch.manual_seed(seed)
    model = mlp()
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
    hopt = hg.Unrolled(
        model, hp, lambda m, h, b: ce(m, h, b) + h.penalty(m), ce,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05), steps=4, checkpoint=True,
    )
    return hopt, every(4)


def unrolled_forward(seed):
    torch.manual_seed(seed)
    model = mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    hp = nn.ModuleDict({"lr": hg.hparams.LearningRate(inner, dtype=DT)})
    hopt = hg.Unrolled(
        model, hp, ce, ce, inner_optimizer=inner,
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05), steps=4, mode="forward",
    )
    return hopt, every(4)


class StnNet(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.l1 = hg.nn.StnLinear(4, 6, n)
        self.l2 = hg.nn.StnLinear(6, 3, n)

    def forward(self, x, hp):
        d = hp.draw(len(x))
        x = hg.nn.gaussian_noise(x, d["noise"], self.training)
        return self.l2(hg.nn.dropout(torch.tanh(self.l1(x, d)), d["dropout"], self.training), d)


def stn_loss(m, h, b):
    return nn.functional.cross_entropy(m(b[0], h), b[1])


def hyper_due(hopt):
    return hopt.hyper_due()


def selftuning(seed):
    torch.manual_seed(seed)
    hp = hg.hparams.SelfTuned(
        dropout=hg.hparams.Rate(0.2, high=0.9), noise=hg.hparams.Positive(0.1), dtype=DT
    )
    model = StnNet(hp.size).to(DT)
    hopt = hg.SelfTuning(
        model, hp, stn_loss, stn_loss,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        delta=True, warmup=2, train_steps=2, val_steps=2,
    )
    return hopt, hyper_due


def best_response(sampling):
    def build(seed):
        torch.manual_seed(seed)
        hp = hg.hparams.SelfTuned(
            decay=hg.hparams.Positive(0.01, transform="exp"), learn_scale=False, dtype=DT
        )
        base = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
        net = hg.nn.HyperNet(base, hp.size, rank=2)

        def val(m, h, b):
            return nn.functional.cross_entropy(m(b[0], hparams=h), b[1])

        def train(m, h, b):
            w = m.weights(h)
            return val(m, h, b) + h.draw(1)["decay"][0] * sum((t**2).sum() for t in w.values())

        hopt = hg.BestResponse(
            net, hp, train, val,
            inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
            outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
            sampling=sampling, warmup=2, train_steps=2, val_steps=2,
        )
        return hopt, hyper_due

    return build


def regression(i):
    g = torch.Generator().manual_seed(2000 + i)
    x = torch.randn(8, 8, generator=g, dtype=DT)
    return x, x[:, :3].sum(1, keepdim=True) + 0.1 * torch.randn(8, 1, generator=g, dtype=DT)


def marglik(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    hp = nn.ModuleDict({
        "prior": hg.hparams.PriorPrecision(model, per="layer", init=1.0),
        "noise": hg.hparams.ObservationNoise(0.5),
        "shift": hg.hparams.RandomTranslation((8,), init=0.5, max=2.0),
    }).to(DT)
    hopt = hg.MarginalLikelihood(
        model, hp, likelihood="regression", data_size=64, subset_size=4,
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        through_map=True, solver=hg.CG(maxiter=4, damping=1e-2), augmentation_samples=2,
        burn_in=1, every=2,
    )
    return hopt, lambda h: h.hyper_step_due()


def implicit_adamhd(seed):
    torch.manual_seed(seed)
    model = mlp()
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
    hopt = hg.Implicit(
        model, hp, lambda m, h, b: ce(m, h, b) + h.penalty(m), ce,
        inner_optimizer=hg.optim.AdamHD(model.parameters(), lr=0.02, hypergrad_lr=1e-3),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05),
        solver=hg.CG(maxiter=4, damping=0.1, warm_start=True),
    )
    return hopt, every(3)


BUILDERS = {
    "unrolled-checkpoint": unrolled_checkpoint,
    "unrolled-forward": unrolled_forward,
    "selftuning-delta": selftuning,
    "best-response-local": best_response("local"),
    "best-response-global": best_response("global"),
    "marglik-through-map": marglik,
    "implicit-adamhd": implicit_adamhd,
}


def act(hopt, due, t):
    """Action t of the run: a hyperstep when due, else an inner step; returns what it reported."""
    if due(hopt):
        batch = regression(50) if isinstance(hopt, hg.MarginalLikelihood) else data(99)
        tb = regression(t) if isinstance(hopt, hg.MarginalLikelihood) else data(t)
        info = hopt.hyper_step(train_batch=tb, val_batch=batch)
        return ["hyper", info.outer_loss, info.hypergrad_norm, info.solver_iterations]
    batch = regression(t) if isinstance(hopt, hg.MarginalLikelihood) else data(t)
    return ["step", float(hopt.step(batch))]


def run(hopt, due, start, stop):
    return [act(hopt, due, t) for t in range(start, stop)]
'''

_NS: dict[str, Any] = {}
exec(compile(_BUILDERS, "<builders>", "exec"), _NS)  # noqa: S102 - our own source, shared with the subprocess
BUILDERS: dict[str, Any] = _NS["BUILDERS"]
StnNet: Any = _NS["StnNet"]
ce: Any = _NS["ce"]
data: Any = _NS["data"]
run: Any = _NS["run"]

#: action after which each run is saved, chosen inside a window / a validation phase (asserted)
SAVE_AT = {
    "unrolled-checkpoint": 6,  # 2 of the window's 4 steps recorded
    "unrolled-forward": 7,  # 3 of 4
    "selftuning-delta": 7,  # ssHHss H|H: between the two hypersteps of a phase
    "best-response-local": 7,
    "best-response-global": 7,
    "marglik-through-map": 4,  # sHss|H: a hyperstep due
    "implicit-adamhd": 5,  # sssHs|s
}
TOTAL = 14


def _assert_same(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _saved(hopt: hg.HyperOptimizer) -> bytes:
    buf = io.BytesIO()
    torch.save(hopt.state_dict(), buf)
    return buf.getvalue()


def _load(raw: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")


@pytest.mark.parametrize("fam", list(SAVE_AT))
def test_a_run_saved_mid_window_resumes_bit_exact_from_another_seed(fam: str) -> None:
    """Saved mid-window (Unrolled), between the two hypersteps of a validation phase (SelfTuning,
    BestResponse), when a hyperstep is due (MarginalLikelihood's own schedule) or between hypersteps
    (Implicit with AdamHD and a warm-started CG); loaded with ``weights_only=True`` into objects
    built from another seed: the losses, hypergradient norms and solver counts after the load,
    and the whole final state (weights, hyperparameters, both optimisers, method state, RNG),
    equal the uninterrupted run's."""
    build = BUILDERS[fam]
    straight, due = build(0)
    log = run(straight, due, 0, TOTAL)
    end = copy.deepcopy(straight.state_dict())  # ("rng" is the process's generator: take it now)
    assert sum(r[0] == "hyper" for r in log) >= 2, log  # the premise: hypersteps on both sides

    first, due1 = build(0)
    k = SAVE_AT[fam]
    head = run(first, due1, 0, k)
    assert head == log[:k]
    raw = _saved(first)
    if fam.startswith(("selftuning", "best-response")):  # inside a validation phase
        assert first.hyper_due() and first.state_dict()["method"]["phase"][1] == 1
        assert log[k][0] == "hyper"
    if fam.startswith("unrolled"):  # mid-window: steps recorded, no hyperstep yet
        assert 0 < first.inner_steps % 4 and log[k][0] == "step"

    resumed, due2 = build(7)
    resumed.load_state_dict(_load(raw))
    tail = run(resumed, due2, k, TOTAL)
    assert tail == log[k:]  # losses, hypergradient norms and solver counts: the same draws
    _assert_same(end, resumed.state_dict())


_CHILD = r"""
import io, sys, torch
exec(sys.stdin.read())
fam, path, start, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
hopt, due = BUILDERS[fam](31)
hopt.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
log = run(hopt, due, start, stop)
torch.save({"log": log, "state": hopt.state_dict()}, path)
"""


def test_selftuning_saved_inside_a_validation_phase_resumes_in_a_new_process(tmp_path: Path) -> None:
    """The self-tuning run (perturbations, dropout, input noise drawn from torch's generator) saved
    between the two hypersteps of a validation phase, continued by a new Python process built
    from another seed: every loss and hypergradient, and the final state, equal the uninterrupted
    run's. Nothing lives only in this process's memory."""
    fam, k = "selftuning-delta", SAVE_AT["selftuning-delta"]
    straight, due = BUILDERS[fam](0)
    log = run(straight, due, 0, TOTAL)
    end = copy.deepcopy(straight.state_dict())  # ("rng" is the process's generator: take it now)
    first, due1 = BUILDERS[fam](0)
    run(first, due1, 0, k)
    assert first.hyper_due()
    path = tmp_path / "run.pt"
    torch.save(first.state_dict(), path)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, fam, str(path), str(k), str(TOTAL)],
        input=_BUILDERS,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = torch.load(path, weights_only=True)
    assert out["log"] == log[k:]
    _assert_same(end, out["state"])


def test_without_its_rng_state_the_resume_differs() -> None:
    """The control: the same self-tuning checkpoint loaded without ``state["rng"]`` draws other
    perturbations and dropout masks, so the comparisons above do see the generator."""
    fam, k = "selftuning-delta", SAVE_AT["selftuning-delta"]
    straight, due = BUILDERS[fam](0)
    log = run(straight, due, 0, TOTAL)
    first, due1 = BUILDERS[fam](0)
    run(first, due1, 0, k)
    state = _load(_saved(first))
    del state["rng"]
    resumed, due2 = BUILDERS[fam](7)
    resumed.load_state_dict(state)
    tail = run(resumed, due2, k, TOTAL)
    assert [r[0] for r in tail] == [r[0] for r in log[k:]] and tail != log[k:]


# ------------------------------------------------------------------------------ GradScaler


def _fp16_supported() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
        return True
    except (RuntimeError, AssertionError):
        return False


def _scaled_run(kind: str, seed: int, init_scale: float) -> tuple[hg.HyperOptimizer, torch.amp.GradScaler]:
    """A float32 model run under float16 autocast inside its losses: Unrolled over 3 steps with
    dropout, or SelfTuning (perturbed dropout and input noise, delta, 2 hypersteps a phase)."""
    torch.manual_seed(seed)
    inner: Any
    if kind == "unrolled":
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3)
        )
        hp: Any = hg.hparams.WeightDecay(model, per="layer", init=1e-3)

        def ce(m: torch.nn.Module, h: torch.nn.Module, b: Any) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.float16):
                out = m(b[0])
            return torch.nn.functional.cross_entropy(out.float(), b[1])

        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        outer = torch.optim.Adam(hp.parameters(), lr=0.05)
        hopt: hg.HyperOptimizer = hg.Unrolled(
            model, hp, lambda m, h, b: ce(m, h, b) + h.penalty(m), ce,  # type: ignore[operator]
            inner_optimizer=inner, outer_optimizer=outer, steps=3,
        )  # fmt: skip
    else:
        hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9), noise=hg.hparams.Positive(0.1))
        net = StnNet(hp.size)

        def stn(m: torch.nn.Module, h: torch.nn.Module, b: Any) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.float16):
                out = m(b[0], h)
            return torch.nn.functional.cross_entropy(out.float(), b[1])

        inner = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        outer = torch.optim.Adam(hp.parameters(), lr=0.05)
        hopt = hg.SelfTuning(
            net, hp, stn, stn, inner_optimizer=inner, outer_optimizer=outer,
            delta=True, warmup=2, train_steps=2, val_steps=2,
        )  # fmt: skip
    return hopt, torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)


def _f32(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data(i)
    return x.float(), y


def _scaled_actions(hopt: hg.HyperOptimizer, sc: torch.amp.GradScaler, start: int, stop: int) -> list[Any]:
    out: list[Any] = []
    for t in range(start, stop):
        if isinstance(hopt, hg.SelfTuning):
            due = hopt.hyper_due()
        else:
            due = (
                hopt.inner_steps > 0
                and hopt.inner_steps % 3 == 0
                and hopt.hyper_steps < hopt.inner_steps // 3
            )
        if due:
            info = hopt.hyper_step(val_batch=_f32(99))
            out.append(["hyper", info.outer_loss, info.hypergrad_norm])
        else:
            loss = hopt.step(_f32(t), scaler=sc, max_grad_norm=5.0)
            out.append(["step", float(loss), sc.get_scale(), hopt.inner_steps])
    return out


@pytest.mark.skipif(not _fp16_supported(), reason="float16 autocast is not supported on this CPU build")
@pytest.mark.parametrize("kind", ["unrolled", "selftuning"])
def test_a_grad_scaler_run_resumes_bit_exact_with_the_scalers_state(kind: str) -> None:
    """float16 autocast with a GradScaler whose scale starts too high (the first steps overflow
    and are skipped) and grows every 2 steps: saved mid-window (Unrolled) or inside a validation
    phase (SelfTuning) as a script does (``{"hopt": hopt.state_dict(), "scaler":
    scaler.state_dict()}``), loaded with ``weights_only=True`` into objects from another seed and
    a scaler built with another scale, it repeats the straight run: which steps overflowed,
    every scale, loss and hypergradient, and the final state of both."""
    straight, sc = _scaled_run(kind, 0, 2.0**24)
    log = _scaled_actions(straight, sc, 0, 16)
    end = copy.deepcopy({"hopt": straight.state_dict(), "scaler": sc.state_dict()})
    assert any(r[0] == "step" and r[3] == 0 for r in log)  # the premise: some steps overflowed
    assert sum(r[0] == "hyper" for r in log) >= 2

    first, sc1 = _scaled_run(kind, 0, 2.0**24)
    k = 9  # (SelfTuning: 6 overflows, 2 steps, 1 of the phase's 2 hypersteps)
    assert _scaled_actions(first, sc1, 0, k) == log[:k]
    if kind == "unrolled":
        assert first.inner_steps % 3 != 0  # mid-window
    else:
        assert first.hyper_due() and log[k - 1][0] == "hyper"  # type: ignore[attr-defined]  # between two
    buf = io.BytesIO()
    torch.save({"hopt": first.state_dict(), "scaler": sc1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    resumed, sc2 = _scaled_run(kind, 5, 2.0**5)
    resumed.load_state_dict(ck["hopt"])
    sc2.load_state_dict(ck["scaler"])
    assert _scaled_actions(resumed, sc2, k, 16) == log[k:]
    _assert_same(end, {"hopt": resumed.state_dict(), "scaler": sc2.state_dict()})


def _unrolled_wd(seed: int, **opts: Any) -> hg.Unrolled:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    hp = hg.hparams.WeightDecay(model, per="layer", init=1e-2)
    return hg.Unrolled(
        model, hp, lambda m, h, b: ce(m, h, b) + h.penalty(m), ce,  # type: ignore[operator]
        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        outer_optimizer=torch.optim.Adam(hp.parameters(), lr=0.05), steps=2, **opts,
    )  # fmt: skip


@pytest.mark.parametrize(
    "opts", [{}, {"checkpoint": True}, {"mode": "forward"}], ids=["reverse", "ckpt", "fwd"]
)
def test_hyperparameters_edited_in_a_checkpoint_are_the_ones_the_later_steps_replay(
    opts: dict[str, Any],
) -> None:
    """A checkpoint saved one step into a period of 4 steps (a window of 2: the hyperstep re-runs
    the 2 steps before the window without a graph), whose decays were replaced before loading
    (a script resuming with new values): the steps after the load use the new values, and so
    must the re-run. The hypergradient equals, bit for bit, that of the same checkpoint loaded
    as saved and changed in place after the load (the case Unrolled sees by the tensors'
    version counters), and differs from the unedited run's (the edit matters)."""
    first = _unrolled_wd(0, **opts)
    for i in range(4):
        first.step(data(i))
    first.hyper_step(val_batch=data(99))
    first.step(data(4))
    state = _load(_saved(first))
    edited = copy.deepcopy(state)
    edited["hparams"]["raw.0"] = edited["hparams"]["raw.0"] + 2.0
    a, b, c = _unrolled_wd(7, **opts), _unrolled_wd(7, **opts), _unrolled_wd(7, **opts)
    a.load_state_dict(edited)
    b.load_state_dict(state)
    c.load_state_dict(state)
    with torch.no_grad():
        b.hparams.raw[0].add_(2.0)  # type: ignore[index]
    grads = []
    for h in (a, b, c):
        for i in range(5, 8):
            h.step(data(i))
        grads.append(h.hypergradient(val_batch=data(99))[0])
    _assert_same(grads[0], grads[1])
    _assert_same(dict(a.model.named_parameters()), dict(b.model.named_parameters()))
    assert not torch.equal(grads[0][0], grads[2][0])


# ------------------------------------------------------------------------------ refused loads


def _mid_run(fam: str) -> dict[str, Any]:
    hopt, due = BUILDERS[fam](0)
    run(hopt, due, 0, SAVE_AT[fam])
    return _load(_saved(hopt))


def _edit(fam: str, change: Any) -> dict[str, Any]:
    state = _mid_run(fam)
    change(state)
    return state


def _other_width(state: dict[str, Any]) -> None:
    torch.manual_seed(3)
    wide = torch.nn.Sequential(
        torch.nn.Linear(4, 7), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(7, 3)
    )
    state["model"] = wide.double().state_dict()


REFUSED = {
    "another class": (
        "selftuning-delta",
        lambda: _mid_run("marglik-through-map"),
        ValueError,
        r"'MarginalLikelihood', not 'SelfTuning'",
    ),
    "another sampling": (
        "best-response-local",
        lambda: _mid_run("best-response-global"),
        ValueError,
        r"sampling='global'",
    ),
    "another delta": (
        "selftuning-delta",
        lambda: _edit("selftuning-delta", lambda s: s["method"].update(delta=False)),
        ValueError,
        r"delta=False\), loaded into delta=True",
    ),
    "other hparams": (
        "unrolled-checkpoint",
        lambda: _mid_run("unrolled-forward"),
        ValueError,
        r"other hyperparameter containers",
    ),
    "another model shape": (
        "unrolled-checkpoint",
        lambda: _edit("unrolled-checkpoint", _other_width),
        RuntimeError,
        r"size mismatch for 0\.weight",
    ),
    "a missing part": (
        "unrolled-forward",
        lambda: _edit("unrolled-forward", lambda s: s.pop("method")),
        ValueError,
        r"missing \['method'\]",
    ),
    "a missing weight": (
        "implicit-adamhd",
        lambda: _edit("implicit-adamhd", lambda s: s["model"].pop("3.bias")),
        RuntimeError,
        r'Missing key\(s\) in state_dict: "3\.bias"',
    ),
    "missing recorded steps": (
        "unrolled-checkpoint",
        lambda: _edit("unrolled-checkpoint", lambda s: s["method"].pop("records")),
        ValueError,
        r"state_dict\['method'\] is not what Unrolled.state_dict\(\) writes \(KeyError: 'records'\)",
    ),
    "a truncated phase": (
        "selftuning-delta",
        lambda: _edit("selftuning-delta", lambda s: s["method"].update(phase=[4])),
        ValueError,
        r"state_dict\['method'\] is not what SelfTuning.*IndexError",
    ),
    "an edited counter": (
        "best-response-global",
        lambda: _edit("best-response-global", lambda s: s["counters"].update(inner_steps="seven")),
        ValueError,
        r"state_dict\['counters'\] is not what BestResponse.*'seven'",
    ),
    "hparams replaced by another container's": (
        "unrolled-checkpoint",
        lambda: _edit(
            "unrolled-checkpoint",
            lambda s: (
                s.pop("hparams_meaning"),
                s.update(hparams={"raw": torch.zeros(3, dtype=torch.float64)}),
            ),
        ),
        RuntimeError,
        r'Missing key\(s\) in state_dict: "raw\.0", "raw\.1"',
    ),
    "hparams of another shape": (
        "marglik-through-map",
        lambda: _edit("marglik-through-map", lambda s: s["hparams"].update({"shift.raw": torch.zeros(2)})),
        RuntimeError,
        r"size mismatch for shift\.raw",
    ),
    "a broken generator state": (
        "selftuning-delta",
        lambda: _edit("selftuning-delta", lambda s: s["rng"].update(cpu=torch.zeros(16, dtype=torch.uint8))),
        RuntimeError,
        r"RNG state",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_load_says_why_and_changes_nothing(case: str) -> None:
    """Each bad checkpoint is refused with an error naming the problem, and the target (weights,
    hyperparameters, optimisers, method state, counters, torch's generator) is as before the call,
    even when the refusal comes after the model, the containers and the optimisers were loaded."""
    fam, make_state, error, match = REFUSED[case]
    state = make_state()
    hopt, due = BUILDERS[fam](5)
    run(hopt, due, 0, 3)
    before = copy.deepcopy(hopt.state_dict())
    with pytest.raises(error, match=match):
        hopt.load_state_dict(state)
    _assert_same(before, hopt.state_dict())
    twin, due2 = BUILDERS[fam](5)
    run(twin, due2, 0, 3)
    _assert_same(before, twin.state_dict())  # (the generator is the process's: the same too)
    after = run(hopt, due, 3, 6)
    torch.set_rng_state(before["rng"]["cpu"])
    assert after == run(twin, due2, 3, 6)


def test_a_state_saved_on_cuda_resumes_on_the_cpu() -> None:
    """A checkpoint written on a GPU and read with ``map_location="cpu"``: its generator state
    holds a ``"cuda"`` entry next to ``"cpu"`` (simulated here: the tensors are device-agnostic
    once mapped), which a CPU run must ignore, and the run continues bit for bit."""
    fam, k = "best-response-global", SAVE_AT["best-response-global"]
    straight, due = BUILDERS[fam](0)
    log = run(straight, due, 0, TOTAL)
    end = copy.deepcopy(straight.state_dict())
    first, due1 = BUILDERS[fam](0)
    run(first, due1, 0, k)
    state = first.state_dict()
    state["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)  # what torch.cuda.get_rng_state gives
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    resumed, due2 = BUILDERS[fam](7)
    resumed.load_state_dict(torch.load(buf, weights_only=True, map_location="cpu"))
    assert run(resumed, due2, k, TOTAL) == log[k:]
    _assert_same(end, resumed.state_dict())


def test_a_refused_load_keeps_the_optimisers_own_groups_and_state() -> None:
    """A load refused after the optimisers were loaded (here: at the method's state, a checkpoint
    of SelfTuning(delta=False)) used to put them back from copies: the values were right, but
    ``param_groups`` and the state tensors were new objects, so a script holding a group to
    write its warm-up learning rate into (``group["lr"] = ...``) silently stopped steering the
    optimiser (the run kept the old rate). Now the very objects are put back, and the script's
    run equals that of a twin that never tried the load."""
    fam = "selftuning-delta"
    state = _edit(fam, lambda s: s["method"].update(delta=False))

    def script(hopt: hg.HyperOptimizer, due: Any, attempt: bool) -> list[Any]:
        group = hopt.inner_optimizer.param_groups[0]  # held, as a warm-up loop may
        log = run(hopt, due, 0, 3)
        momentum = [s["momentum_buffer"] for s in hopt.inner_optimizer.state.values()]
        if attempt:
            rng = torch.get_rng_state()
            with pytest.raises(ValueError, match="delta=False"):
                hopt.load_state_dict(state)
            assert hopt.inner_optimizer.param_groups[0] is group
            now = [s["momentum_buffer"] for s in hopt.inner_optimizer.state.values()]
            assert len(now) == len(momentum) and all(a is b for a, b in zip(now, momentum, strict=True))
            torch.set_rng_state(rng)
        for t in range(3, 9):
            group["lr"] = 0.02 * (t - 2)  # the warm-up
            log += run(hopt, due, t, t + 1)
        return [log, hopt.inner_optimizer.param_groups[0]["lr"], copy.deepcopy(hopt.model.state_dict())]

    twin, due_t = BUILDERS[fam](5)
    expected = script(twin, due_t, attempt=False)
    hopt, due = BUILDERS[fam](5)
    got = script(hopt, due, attempt=True)
    assert got[1] == expected[1] == pytest.approx(0.12)
    _assert_same(expected, got)
