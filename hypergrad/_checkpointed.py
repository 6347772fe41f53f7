r"""Reverse mode through a replay with one step's graph alive at a time (``Unrolled(checkpoint=True)``).

The plain reverse mode builds the graph of all K replayed steps and back-propagates once: its
peak holds K steps' activations and double-backward graphs. Here the K steps are first replayed
without a graph, keeping only each step's inputs (weights, optimiser state, buffers: K
snapshots; buffers are constants); then, from the validation loss backwards, each step is
replayed again *with* its graph from its stored inputs and the cotangents are pulled through it
and freed:

.. math::
    (\bar w_{k-1}, \bar s_{k-1}) = J_k^\top (\bar w_k, \bar s_k), \qquad
    \bar\lambda \mathrel{+}= \Big(\frac{\partial (w_k, s_k)}{\partial \lambda}\Big)^{\!\top}
    (\bar w_k, \bar s_k), \qquad J_k = \frac{\partial (w_k, s_k)}{\partial (w_{k-1}, s_{k-1})}.

Same hypergradient (the same operations, in another order), memory ``K`` snapshots + one step's
graph instead of ``K`` graphs, at the cost of ``K`` more training gradients (no graph) per
hyperstep (about 1.6x the time of the plain reverse mode at K = 5 on an MLP, 1.2-1.4x on the
CNN, ResNet-18 and GPT of ``benchmarks/results/suite-cpu-2core.json``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._functional import clone_all, collecting_gradient_hooks, grads_or_none
from ._inner import State
from ._types import Batch, Tensors

if TYPE_CHECKING:
    from ._unrolled import Unrolled

_Inputs = tuple[Tensors, list[State], Tensors]


def _differentiable(t: Any) -> bool:
    """A tensor cotangents flow through: real or complex (a complex weight's momentum or moments
    carry its history as much as a real one's)."""
    return isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())


def _fresh(weights: Tensors, states: list[State], buffers: Tensors) -> tuple[_Inputs, list[Tensor]]:
    """Detached copies of a step's inputs, the weights and float state tensors requiring grad, and
    the list of those leaves in a fixed order (weights, then states). Buffers are constants
    (BatchNorm's running statistics take no gradient)."""
    w = tuple(t.detach().requires_grad_(True) for t in weights)
    leaves: list[Tensor] = list(w)
    st: list[State] = []
    for s in states:
        d: State = {}
        for k, v in s.items():
            if k != "step" and _differentiable(v):
                v = v.detach().requires_grad_(True)
                leaves.append(v)
            d[k] = v
        st.append(d)
    # the step runs on non-leaf copies of the weight leaves, as the plain replay's weights are:
    # nn.Embedding(max_norm=...) renormalises the rows it looks up in place, differentiably only
    # on a non-leaf weight (on a leaf, torch's renormalisation through ``weight.detach()``: the
    # checkpointed hypergradient lost the renormalisation's derivative, 13% off, silently)
    return (tuple(t.clone() for t in w), st, tuple(t.detach() for t in buffers)), leaves


def _outputs(weights: Tensors, states: list[State], like: _Inputs) -> list[Tensor | None]:
    """A step's outputs aligned with the leaves :func:`_fresh` makes of ``like`` (the next step's
    inputs): ``None`` where an output does not exist."""
    out: list[Tensor | None] = list(weights)
    for s_out, s_like in zip(states, like[1], strict=True):
        for k, v in s_like.items():
            if k != "step" and _differentiable(v):
                out.append(s_out.get(k))
    return out


def checkpointed_hypergradient(
    hopt: Unrolled, val_batch: Batch, hp: Sequence[Tensor]
) -> tuple[list[Tensor | None], Tensor]:
    """``(dL_V/dhp or None where unreached, L_V detached)`` for :class:`~hypergrad.Unrolled`'s
    recorded window, one replayed step's graph at a time (see the module docstring)."""
    pair = hopt.pair
    records = list(hopt._records)[len(hopt._records) - hopt._window() :]
    hp = list(hp)
    # 1. the replay without graphs, keeping each step's inputs
    inputs: list[_Inputs] = []
    w, st, bf = hopt._start()
    for rec in records:
        inputs.append((w, st, bf))
        with torch.enable_grad():  # (on copies: a step's forward may write its weights in place)
            w2, st2, bf2 = hopt._replay_step(rec, tuple(t.clone() for t in w), st, bf, hp, create_graph=False)
        w = tuple(t.detach().requires_grad_(True) for t in w2)
        st = [{k: v.detach() if isinstance(v, Tensor) else v for k, v in s.items()} for s in st2]
        bf = tuple(t.detach() for t in bf2)
    hopt._check_reproduced(w)
    # 2. the validation loss at the final weights
    final, leaves = _fresh(w, st, bf)
    n_w = len(final[0])
    val_hooks: list[Any] = []  # (gradient hooks its forward registers: see Unrolled's reverse mode)
    with collecting_gradient_hooks(val_hooks, model_only=True):
        out = pair.loss(
            hopt.val_loss, val_batch, weights=final[0], buffers=clone_all(pair.buffers()), hparams=hp
        )
    for handle in val_hooks:
        handle.remove()
    want = leaves[:n_w] + hp
    # (a validation loss that reaches nothing, detached by mistake: no gradient, said by the caller)
    g = grads_or_none(out, want) if out.requires_grad else (None,) * len(want)
    cot: list[Tensor | None] = list(g[:n_w]) + [None] * (len(leaves) - n_w)
    total: list[Tensor | None] = list(g[n_w:])
    nxt = final
    # 3. backwards through the steps, each replayed with its graph from its inputs
    for k in range(len(records) - 1, -1, -1):
        if all(c is None for c in cot):
            break  # nothing flows further back (the hyperparameters reach no earlier step)
        ins, leaves_k = _fresh(*inputs[k])
        w_out, st_out, bf_out = hopt._replay_step(records[k], *ins, hp)
        outs = _outputs(w_out, st_out, nxt)
        pairs = [(o, c) for o, c in zip(outs, cot, strict=True) if o is not None and c is not None]
        pairs = [(o, c) for o, c in pairs if o.requires_grad]
        want = ([] if k == 0 else leaves_k) + hp  # the first step's inputs are constants
        gs: Sequence[Tensor | None] = (None,) * len(want)
        if pairs:
            gs = torch.autograd.grad([o for o, _ in pairs], want, [c for _, c in pairs], allow_unused=True)
        del w_out, st_out, bf_out, outs, pairs
        if k > 0:
            cot = list(gs[: len(leaves_k)])
            nxt = inputs[k]
        for i, gi in enumerate(gs[len(want) - len(hp) :]):
            if gi is not None:
                prev = total[i]
                total[i] = gi if prev is None else prev + gi
    return total, out.detach().clone()
