"""Round 26: awkward models, with several research-code habits at once, through every family.

One model holds a submodule under two names (``alias`` is ``block``), a weight tied into another
module (``block2.weight is block.weight``), a frozen part, a branch the loss reaches on some
batches only (``aux``: ``.grad`` None on the others), a forward pre-hook and a forward hook that
change inputs and outputs, BatchNorm in training mode, a running mean the model keeps in a buffer
and updates in forward, and two param groups with different lr / momentum / nesterov /
weight_decay. References are independent: central differences of the real (plain PyTorch)
training in float64, and a dense IFT built with ``torch.autograd.functional.hessian``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import hypergrad as hg

DT = torch.float64


class _Awkward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.block = nn.Linear(3, 3)
        self.alias = self.block  # one submodule, two names
        self.block2 = nn.Linear(3, 3)
        self.block2.weight = self.block.weight  # tied into another module
        self.aux = nn.Linear(3, 2)  # reached on some batches only
        self.head = nn.Linear(3, 2)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.register_buffer("run_mean", torch.zeros(3))
        self.enc.register_forward_pre_hook(lambda m, inp: (inp[0] * 1.5,))
        self.block2.register_forward_hook(lambda m, i, o: o + 0.1 * o**2)

    def forward(self, x: torch.Tensor, use_aux: bool) -> torch.Tensor:
        h = torch.tanh(self.bn(self.enc(x)))
        if self.training:  # a statistic the user keeps (logged, not used by the loss)
            with torch.no_grad():
                self.run_mean.mul_(0.9).add_(0.1 * h.mean(0))
        h = torch.tanh(self.alias(h)) + self.frozen(h)
        h = torch.tanh(self.block2(h))
        out = self.head(h)
        if use_aux:
            out = out + self.aux(h)
        return out


def _groups(m: _Awkward) -> list[dict]:
    trained = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    g1 = [p for n, p in trained if not n.startswith(("head.", "aux."))]
    g2 = [p for n, p in trained if n.startswith(("head.", "aux."))]
    return [
        {"params": g1, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
        {"params": g2, "lr": 0.05, "momentum": 0.5, "nesterov": True, "weight_decay": 0.0},
    ]


def _make(
    init: float = 0.05, weight_norm: bool = False
) -> tuple[_Awkward, hg.hparams.WeightDecay, torch.optim.SGD]:
    torch.manual_seed(0)
    m = _Awkward().to(DT)
    if weight_norm:  # on the aliased layer (untied first: on a tied one, see the sharing bug below)
        m.block2.weight = nn.Parameter(m.block2.weight.detach().clone())
        parametrizations.weight_norm(m.alias, "weight")
    hp = hg.hparams.WeightDecay(m, per="layer", init=init).to(DT)
    return m, hp, torch.optim.SGD(_groups(m), lr=0.1)


def _data() -> tuple[list, tuple]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 8, 4, generator=g, dtype=DT)
    y = torch.randint(0, 2, (6, 8), generator=g)
    return [(x[i], y[i], i % 2 == 0) for i in range(5)], (x[5], y[5], True)


def _tl(m, h, b):
    return nn.functional.cross_entropy(m(b[0], b[2]), b[1]) + h.penalty(m)


def _vl(m, h, b):
    return nn.functional.cross_entropy(m(b[0], b[2]), b[1])


def _flat(hp: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(hp.parameters()).detach().clone()


def _real(
    raw: torch.Tensor, batches: list, weight_norm: bool = False
) -> tuple[_Awkward, nn.Module, torch.optim.SGD]:
    m, hp, opt = _make(weight_norm=weight_norm)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(raw, hp.parameters())
    for b in batches:
        opt.zero_grad()
        _tl(m, hp, b).backward()
        opt.step()
    return m, hp, opt


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# --------------------------------------------------------------------------------- passing tests


@pytest.mark.parametrize("weight_norm", [False, True], ids=["plain", "weight_norm"])
@pytest.mark.parametrize(
    "kw", [{}, {"mode": "forward"}, {"checkpoint": True}], ids=["reverse", "forward", "checkpoint"]
)
def test_awkward_model_unrolled_matches_the_real_trainings_finite_differences(
    kw: dict, weight_norm: bool
) -> None:
    # new: all the habits at once (alias + tie + hooks + BN + kept buffer + frozen part + a branch
    # unreached on odd batches + two SGD groups, one nesterov) through every Unrolled mode, and the
    # model after hopt.step equal, bit for bit, to plain PyTorch's (weights, buffers, .grad,
    # optimiser state, including the unreached branch's momentum)
    batches, val = _data()
    m0, hp0, _ = _make(weight_norm=weight_norm)
    r0 = _flat(hp0)
    ref = torch.zeros_like(r0)
    for i in range(r0.numel()):
        e = torch.zeros_like(r0)
        e[i] = 1e-6
        ref[i] = (
            _vl(*_real(r0 + e, batches, weight_norm)[:2], val)
            - _vl(*_real(r0 - e, batches, weight_norm)[:2], val)
        ) / 2e-6
    m, hp, opt = _make(weight_norm=weight_norm)
    hopt = hg.Unrolled(
        m,
        hp,
        _tl,
        _vl,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        steps=5,
        **kw,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.ReplayWarning)
        for b in batches:
            hopt.step(b)
        grads, _ = hopt.hypergradient(val_batch=val)
    got = torch.cat([g.reshape(-1) for g in grads])
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    mr, _, optr = _real(r0, batches, weight_norm)
    assert _same([p for p in m.parameters()], [p for p in mr.parameters()])
    assert _same([p.grad for p in m.parameters()], [p.grad for p in mr.parameters()])
    assert _same(list(m.buffers()), list(mr.buffers()))
    assert _same(opt.state_dict(), optr.state_dict())
    assert m.frozen.weight.grad is None


def _dense_ift(m: _Awkward, hp: nn.Module, tb: tuple, vb: tuple) -> torch.Tensor:
    """dL_V/dλ = ∂_λ L_V − (∂_λ ∇_w L_T)ᵀ H⁻¹ ∇_w L_V (H with SGD's coupled decay), over the
    trained weights (each tied weight once), on deep copies whose parameters are replaced by
    slices of one flat vector."""
    trained = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    sizes = [p.numel() for _, p in trained]
    hnames = [n for n, _ in hp.named_parameters()]
    hsizes = [p.numel() for p in hp.parameters()]

    def call(loss, w, h, batch):
        mm, hh = copy.deepcopy(m), copy.deepcopy(hp)
        by_id = {id(p): x.view(p.shape) for (_, p), x in zip(trained, torch.split(w, sizes), strict=True)}
        # every place (both names of the alias, both modules of the tie) gets the slice
        for n, p in list(m.named_parameters(remove_duplicate=False)):
            if id(p) in by_id:
                owner, _, k = n.rpartition(".")
                mm.get_submodule(owner)._parameters[k] = by_id[id(p)]
        for n, x, p in zip(hnames, torch.split(h, hsizes), hp.parameters(), strict=True):
            owner, _, k = n.rpartition(".")
            hh.get_submodule(owner)._parameters[k] = x.view(p.shape)
        return loss(mm, hh, batch)

    w0 = torch.cat([p.detach().reshape(-1) for _, p in trained])
    h0 = _flat(hp)
    F = torch.autograd.functional
    hess = F.hessian(lambda w: call(_tl, w, h0, tb), w0)
    # SGD's coupled weight_decay (group 1's 1e-3) is part of the training's fixed point
    coupled = {id(p): g["weight_decay"] for g in _groups(m) for p in g["params"]}
    hess = hess + torch.diag(
        torch.cat([torch.full((p.numel(),), coupled[id(p)], dtype=DT) for _, p in trained])
    )
    assert torch.linalg.eigvalsh(hess)[0] > 0.1  # (a solved, well-conditioned inner problem)
    gv = F.jacobian(lambda w: call(_vl, w, h0, vb), w0)
    gh = F.jacobian(lambda h: call(_vl, w0, h, vb), h0)
    mixed = F.jacobian(lambda h: F.jacobian(lambda w: call(_tl, w, h, tb), w0, create_graph=True), h0)
    return gh - mixed.T @ torch.linalg.solve(hess, gv)


@pytest.mark.parametrize("weight_norm", [False, True], ids=["plain", "weight_norm"])
def test_awkward_model_implicit_solvers_match_a_dense_ift(weight_norm: bool) -> None:
    # new: the same model through Implicit (Direct, CG, Neumann), at a hyperstep whose training
    # batch does not reach the aux branch (its curvature is its decay alone) while the
    # validation batch does, also with weight norm on the aliased layer; the reference IFT is
    # dense, built with autograd.functional
    batches, val = _data()
    m, hp, opt = _make(init=1.0, weight_norm=weight_norm)
    hopt = hg.Implicit(
        m,
        hp,
        _tl,
        _vl,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.0),
        solver=hg.Direct(),
    )
    for b in batches * 12:
        hopt.step(b)
    tb = batches[3]  # use_aux False
    ref = _dense_ift(m, hp, tb, val)
    for solver in (hg.Direct(), hg.CG(maxiter=100, tol=1e-12), hg.Neumann(steps=200, alpha=0.5)):
        hopt.solver = solver
        before = ([p.detach().clone() for p in m.parameters()], [b.clone() for b in m.buffers()])
        grads, _ = hopt.hypergradient(train_batch=tb, val_batch=val)
        got = torch.cat([g.reshape(-1) for g in grads])
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-10)
        assert _same(before, ([p for p in m.parameters()], list(m.buffers())))


# ------------------------------------------------------------------------------------ the bugs


class _TiedByCopy(nn.Module):
    """``decoder.weight = nn.Parameter(encoder.weight)``: a common way to "tie" that makes a second
    Parameter over the same memory (Parameter(t) shares t's storage)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        # (float64 from the start: .to(dtype) would give each Parameter a storage of its own)
        self.enc = nn.Linear(3, 3, dtype=DT)
        self.dec = nn.Linear(3, 3, dtype=DT)
        self.head = nn.Linear(3, 2, dtype=DT)
        if how == "parameter":
            self.dec.weight = nn.Parameter(self.enc.weight)
        elif how == "frozen":  # a trained layer "initialised" from a frozen pretrained one
            self.enc.requires_grad_(False)
            self.dec.weight = nn.Parameter(self.enc.weight)
        else:  # tied properly, then weight norm on one side: torch makes v over the tied memory
            self.dec.weight = self.enc.weight
            parametrizations.weight_norm(self.enc, "weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.dec(torch.tanh(self.enc(x)))))


@pytest.mark.parametrize("how", ["parameter", "weight_norm", "frozen"])
@pytest.mark.parametrize("family", ["implicit", "unrolled"])
def test_trained_parameters_sharing_memory_are_refused(how: str, family: str) -> None:
    torch.manual_seed(0)
    m = _TiedByCopy(how)
    shared = [
        p
        for p in m.parameters()
        if p.untyped_storage().data_ptr() == m.dec.weight.untyped_storage().data_ptr()
    ]
    assert len(shared) == 2  # (what torch made: two Parameters, one memory)
    hp = hg.hparams.WeightDecay(m, per="layer", init=0.05).to(DT)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    outer = torch.optim.SGD(hp.parameters(), lr=0.1)

    def tl(mm, h, b):
        return nn.functional.cross_entropy(mm(b[0]), b[1]) + h.penalty(mm)

    def vl(mm, h, b):
        return nn.functional.cross_entropy(mm(b[0]), b[1])

    # Each real optimiser step writes that memory once per trained Parameter (and moves the frozen
    # one with it), while autograd and every method take them for independent tensors (the real
    # training is that of one tied tensor updated twice per step): Implicit's H and mixed term are
    # those of another model, with no error or warning; Unrolled's replay ends away from the real
    # weights, which its ReplayWarning reports only at its 1st / 16th hyperstep and never while the
    # hyperparameters move within the window (for "frozen", a warning about "a running statistic
    # kept as an nn.Parameter")
    with pytest.raises(ValueError, match="share memory"):
        if family == "implicit":
            hg.Implicit(m, hp, tl, vl, inner_optimizer=opt, outer_optimizer=outer, solver=hg.Direct())
        else:
            hg.Unrolled(m, hp, tl, vl, inner_optimizer=opt, outer_optimizer=outer, steps=2)


def test_parameters_as_disjoint_views_of_one_flat_buffer_are_not_refused() -> None:
    # the guard the fix above adds must not refuse weights that are disjoint views of one flat
    # buffer (contiguous-params tricks, flat fused weights): they share a storage, not memory
    torch.manual_seed(0)
    flat = torch.randn(3 * 3 + 3 + 2 * 3 + 2, dtype=DT)
    m = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).to(DT)
    views = torch.split(flat, [9, 3, 6, 2])
    for mod, (w, b) in ((m[0], views[:2]), (m[2], views[2:])):
        mod.weight = nn.Parameter(w.view(mod.weight.shape))
        mod.bias = nn.Parameter(b)
    hp = hg.hparams.WeightDecay(m, per="layer", init=0.05).to(DT)

    def loss(mm, h, b):
        return nn.functional.cross_entropy(mm(b[0]), b[1]) + h.penalty(mm)

    hopt = hg.Implicit(
        m,
        hp,
        loss,
        loss,
        inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=0.1),
        solver=hg.Direct(),
    )
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 2, (8,))
    hopt.step((x, y))
    hopt.hyper_step(train_batch=(x, y), val_batch=(x, y))


def test_unrolled_warns_when_a_forward_hook_appears_inside_the_window() -> None:
    batches, val = _data()
    m, hp, opt = _make()

    def hook(mod, inp):  # e.g. an input scaling switched on after a warm-up
        return (inp[0] * 2.0,)

    hopt = hg.Unrolled(
        m,
        hp,
        _tl,
        _vl,
        inner_optimizer=opt,
        outer_optimizer=torch.optim.SGD(hp.parameters(), lr=1.0),
        steps=3,
    )
    start = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, b in enumerate(batches):
            if i == 3:
                handle = m.head.register_forward_pre_hook(hook)
            if i == 2:
                start = (copy.deepcopy(m), copy.deepcopy(opt.state_dict()))
            hopt.step(b)
            if i < 4:
                hopt.hyper_step(val_batch=val)  # every step: the hyperparameters move in the window
        grads, info = hopt.hypergradient(val_batch=val)
    warned = any(
        issubclass(w.category, hg.ReplayWarning) and "register_forward_hook" in str(w.message) for w in caught
    )

    # reference: the window's three real steps (2, 3, 4) from the state before step 2, with the
    # current hyperparameters and the hook there from step 3 on, as in the real run
    raw = _flat(hp)

    def window(r: torch.Tensor) -> torch.Tensor:
        mm = copy.deepcopy(start[0])
        _, hh, _ = _make()
        o = torch.optim.SGD(_groups(mm), lr=0.1)
        o.load_state_dict(copy.deepcopy(start[1]))  # (load_state_dict keeps the tensors given)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(r, hh.parameters())
        for i in (2, 3, 4):
            if i == 3:
                mm.head.register_forward_pre_hook(hook)
            o.zero_grad()
            _tl(mm, hh, batches[i]).backward()
            o.step()
        return _vl(mm, hh, val)

    ref = torch.zeros_like(raw)
    for i in range(raw.numel()):
        e = torch.zeros_like(raw)
        e[i] = 1e-6
        ref[i] = (window(raw + e) - window(raw - e)) / 2e-6
    got = torch.cat([g.reshape(-1) for g in grads])
    right = torch.allclose(got, ref, rtol=1e-5, atol=1e-9)
    # current code: got (-4.1e-05, -1.4e-05, 1.54e-03, -4.98e-04, 1.11e-03, -1.49e-03), reference
    # (-7.8e-05, -2.6e-06, 1.94e-03, -8.51e-04, 1.25e-03, -1.87e-03); outer_loss 0.714 for the
    # real weights' 0.735; and no warning
    assert warned or right
    handle.remove()


class _SparseTable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=True, dtype=DT)
        self.head = nn.Linear(4, 2, dtype=DT)

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(i).mean(1))


@pytest.mark.parametrize("family", ["implicit", "unrolled"])
def test_a_second_optimiser_trains_its_part_as_with_plain_backward(family: str) -> None:
    # The usual recipe for a sparse embedding: SparseAdam for the table, Adam for the rest (one
    # optimiser cannot hold both). Only the dense part can be inner_optimizer; the table keeps
    # requires_grad=True and is stepped by the user after hopt.step(), as after loss.backward().
    # Current code: backward(inputs=trained weights) leaves the table's .grad None, so
    # SparseAdam steps nothing and the table never moves (no error, no warning).
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randint(0, 10, (8, 3), generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(4)
    ]

    def build():
        torch.manual_seed(0)
        m = _SparseTable()
        hp = hg.hparams.WeightDecay(m, per="layer", init=0.01, include=["head.weight", "head.bias"]).to(DT)
        return (
            m,
            hp,
            torch.optim.Adam(m.head.parameters(), lr=0.05),
            torch.optim.SparseAdam(m.emb.parameters(), lr=0.05),
        )

    def tl(mm, h, b):
        return nn.functional.cross_entropy(mm(b[0]), b[1]) + h.penalty(mm)

    m0, hp0, dense0, sparse0 = build()
    for b in batches:  # plain PyTorch
        dense0.zero_grad()
        sparse0.zero_grad()
        tl(m0, hp0, b).backward()
        dense0.step()
        sparse0.step()

    m, hp, dense, sparse = build()
    outer = torch.optim.SGD(hp.parameters(), lr=0.0)
    if family == "implicit":
        hopt: hg.HyperOptimizer = hg.Implicit(m, hp, tl, tl, inner_optimizer=dense, outer_optimizer=outer)
    else:
        hopt = hg.Unrolled(m, hp, tl, tl, inner_optimizer=dense, outer_optimizer=outer, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hg.ReplayWarning)  # (the table moves outside step(): said so)
        for b in batches:
            sparse.zero_grad()
            hopt.step(b)
            sparse.step()
    for (n, p), q in zip(m.named_parameters(), m0.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=n)
