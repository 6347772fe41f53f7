r"""Best-response methods: self-tuning networks and best-response hypernetworks.

Both learn an approximation :math:`\hat w_\phi(\lambda)` of the best response
:math:`w^*(\lambda) = \arg\min_w L_T(w, \lambda)` and move :math:`\lambda` on the validation loss
*through* it:

.. math::
    \text{inner:}\quad \min_\phi\ \mathbb{E}_{\tilde\lambda \sim p(\cdot \mid \lambda, \sigma)}
        L_T(\hat w_\phi(\tilde\lambda), \tilde\lambda), \qquad
    \text{outer:}\quad \min_{\lambda, \sigma}\ \mathbb{E}_{\epsilon}
        L_V(\hat w_\phi(\lambda + \sigma\epsilon)) - \tau\, \mathbb{H}[N(0, \sigma^2)].

The training loss is never differentiated w.r.t. :math:`\lambda`, so dropout rates, augmentation
strengths and integer hyperparameters can be tuned. The hypergradient costs one validation
forward/backward pass (no Hessian, no replay).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import CheckpointError

from ._base import (
    HyperOptimizer,
    HyperStepInfo,
    OnNonFinite,
    _Hypergradient,
    _params_of,
    _put_attributes_back,
    _values_off_domain,
)
from ._functional import (
    _THREAD,
    _close_swap,
    _open_swap,
    batch_versions,
    check_batch,
    clone_all,
    clone_batch,
    collecting_gradient_hooks,
    dual_level,
    grads_or_none,
    iter_tensors,
    materialize,
)
from ._stn_hparams import (
    Positive,
    SelfTuned,
    _in_backward,
    _load_state,
    _Mode,
    _state,
    check_config,
    linearising,
    validating,
)
from ._types import Batch, LossFn, Tensors
from ._wrap import compiled_run_eagerly, ddp_wrappers
from .nn import HyperNet, StnLayer, response_masks, stn_layers


def selftuning_hypergradient(
    val_loss: Callable[[], Tensor], hparams: SelfTuned, entropy_weight: float
) -> tuple[Tensors, Tensor, Tensor]:
    r"""The outer gradient of a best-response method, over a closure.

    :math:`\nabla_{(\lambda, \sigma)} \big[L_V - \tau \sum_j \log\sigma_j\big]`, where ``val_loss``
    reads the hyperparameters through ``hparams.draw`` (and so through the best response). The
    draws are whatever ``hparams.draw`` gives where this is called: outside a method's hyperstep,
    the current value, unperturbed, its values differentiable as in a hyperstep (so
    :math:`\sigma` gets the entropy term only);
    :class:`~hypergrad.SelfTuning`'s hyperstep calls it with perturbed draws
    :math:`\lambda + \sigma\epsilon` that are differentiable w.r.t. both.

    Args:
        val_loss: closure computing :math:`L_V` (0-dim).
        hparams: the :class:`~hypergrad.hparams.SelfTuned` container.
        entropy_weight: :math:`\tau \ge 0`, finite (ignored when ``hparams`` does not learn its
            scale).

    Returns:
        ``(grads, val_loss, reached)``: ``grads`` shaped like ``list(hparams.parameters())``
        (zeros where nothing reached a parameter), the detached validation loss (0-dim), and a
        bool tensor :math:`(n,)`, one entry per parameter, saying whether any gradient reached it.

    Raises:
        TypeError: ``hparams`` not a :class:`~hypergrad.hparams.SelfTuned`.
        ValueError: ``entropy_weight`` not a finite number >= 0, or ``val_loss`` returning
            anything but a 0-dim floating-point tensor.
        RuntimeError: called under ``torch.inference_mode()`` (under ``torch.no_grad()``
            ``val_loss`` runs with autograd on, as a method's hyperstep does).

    Cost: one call of ``val_loss`` and one backward pass; no host synchronisation.

    >>> import torch, hypergrad as hg
    >>> hp = hg.hparams.SelfTuned(p=hg.hparams.Rate(0.5), learn_scale=False)
    >>> g, lv, _ = selftuning_hypergradient(lambda: (hp.draw(1).features ** 2).sum(), hp, 0.0)
    >>> round(float(g[0]), 6)        # d/dr r^2 at r = logit(0.5) = 0
    0.0
    """
    if not isinstance(hparams, SelfTuned):
        raise TypeError(
            "selftuning_hypergradient needs hparams = hg.hparams.SelfTuned(...), got "
            f"{type(hparams).__name__}"
        )
    _check_entropy_weight(entropy_weight)
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "selftuning_hypergradient was called under torch.inference_mode(); it needs autograd "
            "(the gradient w.r.t. the hyperparameters): call it outside that block"
        )
    params = list(hparams.parameters())
    # outside a method's hyperstep the draws' values are detached (plain numbers): here a
    # val_loss reading them directly (a penalty on the value) must get its gradient
    mean = hparams._mode is _Mode.MEAN
    # autograd on whatever the caller's grad mode (under torch.no_grad() every gradient came out
    # a silent 0, as if nothing reached the hyperparameters)
    # gradient hooks that val_loss's forward pass registers (a hook the model puts on an
    # activation, a module's full backward (pre-)hook) shape training gradients; on this gradient
    # they scaled it (an activation's gradient halved by a hook: a hypergradient half the central
    # differences', silently): removed before the backward pass
    hooks: list[Any] = []
    with (
        torch.enable_grad(),
        hparams._drawing(_Mode.VAL_MEAN) if mean else contextlib.nullcontext(),
        collecting_gradient_hooks(hooks, model_only=True),
    ):
        lv = val_loss()
        if not (isinstance(lv, Tensor) and lv.dim() == 0 and lv.is_floating_point()):
            what = f"a tensor of shape {tuple(lv.shape)}" if isinstance(lv, Tensor) else type(lv).__name__
            raise ValueError(
                f"selftuning_hypergradient: val_loss must return a 0-dim float tensor, got {what}"
            )
        obj = lv - entropy_weight * hparams.entropy() if hparams.learn_scale else lv
    for handle in hooks:
        handle.remove()
    gs = grads_or_none(obj, params)
    reached = torch.tensor([g is not None for g in gs])
    return materialize(gs, params), lv.detach(), reached


def _check_entropy_weight(value: Any) -> None:
    # (a negative weight flipped the entropy term, a NaN made every sigma's gradient NaN)
    if not (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    ):
        raise ValueError(f"Invalid entropy_weight: {value!r} (need a finite number >= 0)")


def _attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention`` from operations with a forward-mode derivative that
    reverse mode can differentiate (same values up to rounding): ``softmax(q k^T s + mask) v``."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    s = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    w = (query @ key.transpose(-2, -1)) * s
    n, m = w.shape[-2], w.shape[-1]
    if is_causal:
        keep = torch.ones(n, m, dtype=torch.bool, device=w.device).tril()
        w = w.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        w = w.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else w + attn_mask
    # a query with every key masked (left padding under a causal mask, an all-padding example)
    # gets 0, as torch's kernels give it (their _safe_softmax), not 0/0 = NaN: every step of such
    # a batch was refused as non-finite (its gradient NaN) while the base pass had trained on it
    top = w.amax(-1, keepdim=True).detach()
    e = (w - top.masked_fill(top == float("-inf"), 0)).exp()
    den = e.sum(-1, keepdim=True)
    p = e / torch.where(den > 0, den, torch.ones_like(den))
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return p @ value


def _softmax_dim(x: Tensor, dim: int | None) -> int:
    # (torch's legacy implicit dimension for softmax without dim)
    return (0 if x.dim() in (0, 1, 3) else 1) if dim is None else dim


def _softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: Any = None) -> Tensor:
    x = input if dtype is None else input.to(dtype)
    dim = _softmax_dim(x, dim)
    e = (x - x.amax(dim, keepdim=True).detach()).exp()
    return e / e.sum(dim, keepdim=True)


def _log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: Any = None) -> Tensor:
    x = input if dtype is None else input.to(dtype)
    dim = _softmax_dim(x, dim)
    z = x - x.amax(dim, keepdim=True).detach()
    return z - z.exp().sum(dim, keepdim=True).log()


def _logsumexp(input: Tensor, dim: Any, keepdim: bool = False) -> Tensor:
    m = input.amax(dim, keepdim=True).detach()
    m = torch.where(m.isinf(), torch.zeros_like(m), m)
    out = (input - m).exp().sum(dim, keepdim=True).log() + m
    return out if keepdim else out.squeeze(dim)


def _glu(input: Tensor, dim: int = -1) -> Tensor:
    # (torch's glu_jvp has no derivative: "derivative for aten::glu_jvp is not implemented")
    a, b = input.chunk(2, dim)
    return a * torch.sigmoid(b)


def _torch_softmax(input: Tensor, dim: int, dtype: Any = None) -> Tensor:
    # (torch.softmax's third positional argument is the dtype; F.softmax's is _stacklevel)
    return _softmax(input, dim, dtype=dtype)


def _torch_log_softmax(input: Tensor, dim: int, dtype: Any = None) -> Tensor:
    return _log_softmax(input, dim, dtype=dtype)


def _tensor_softmax(self: Tensor, dim: int, dtype: Any = None) -> Tensor:
    return _softmax(self, dim, dtype=dtype)


def _tensor_log_softmax(self: Tensor, dim: int, dtype: Any = None) -> Tensor:
    return _log_softmax(self, dim, dtype=dtype)


def _tensor_logsumexp(self: Tensor, dim: Any, keepdim: bool = False) -> Tensor:
    return _logsumexp(self, dim, keepdim)


#: (owner, attribute, composite) swapped by :func:`_composite_operations`
_COMPOSITES: tuple[tuple[Any, str, Any], ...] = (
    (F, "scaled_dot_product_attention", _attention),
    (F, "softmax", _softmax),
    (F, "log_softmax", _log_softmax),
    (F, "glu", _glu),  # (nn.GLU calls it)
    (torch, "softmax", _torch_softmax),
    (torch, "log_softmax", _torch_log_softmax),
    (torch, "logsumexp", _logsumexp),
    (torch.special, "softmax", _torch_softmax),
    (torch.special, "log_softmax", _torch_log_softmax),
    (torch.special, "logsumexp", _logsumexp),
    (Tensor, "softmax", _tensor_softmax),
    (Tensor, "log_softmax", _tensor_log_softmax),
    (Tensor, "logsumexp", _tensor_logsumexp),
)


def _composite_targets() -> list[tuple[Any, str, Any]]:
    """:data:`_COMPOSITES` as (owner, attribute, replacement), each replacement the composite in
    a thread inside a linearised call and the original elsewhere (another thread's model, in
    the same process, keeps torch's kernels)."""

    def dispatch(original: Any, composite: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            return (composite if _THREAD.linearising else original)(*args, **kwargs)

        return call

    return [(owner, name, dispatch(getattr(owner, name), c)) for owner, name, c in _COMPOSITES]


_COMPOSITE_STATE: dict[str, Any] = {"open": 0, "saved": []}


@contextlib.contextmanager
def _composite_operations() -> Iterator[None]:
    """Within the block, the operations whose forward-mode derivative reverse mode cannot then
    differentiate (softmax, log_softmax and logsumexp: their jvp writes in place a tensor their
    backward needs, "modified by an inplace operation", torch 2.13; glu: its jvp has no
    derivative) or that have none (the fused
    kernels of ``F.scaled_dot_product_attention``) are composed of plain operations (same values
    up to rounding), for calls that look them up at call time: ``torch.softmax``, ``F.softmax``
    (``nn.Softmax``), ``x.softmax(...)``, ``nn.MultiheadAttention``'s attention, ... Swapped
    while a block is open in any thread and restored when the last one closes (two overlapping
    blocks in two threads, each restoring what it found, left the composites in place for
    good); the swapped entry points run the composite only in a thread inside a linearised call
    (:func:`~hypergrad._stn_hparams.linearising`)."""
    _open_swap(_COMPOSITE_STATE, _composite_targets)
    try:
        yield
    finally:
        _close_swap(_COMPOSITE_STATE)


class _Linearised:
    r"""Stands in for the model in Delta-STN's response step: a call returns the network's output
    linearised in the centred perturbation, :math:`f(x; w_0) + J_\Delta f(x; w_0)\,\Delta`
    (one forward-mode pass: the STN layers see the features as a dual number with primal 0 and
    tangent :math:`\Delta`); anything else is the model's."""

    def __init__(self, model: nn.Module) -> None:
        object.__setattr__(self, "_model", model)

    # (never traced: a compiled train_loss, or a compiled function calling step(), failed here
    # with dynamo's "Attempt to trace forbidden callable set_stance"; it graph-breaks instead)
    @torch.compiler.disable
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # a torch.compile'd model runs eagerly here: its graphs drop the forward-mode tangent
        # (the linearised output came out silently wrong, not refused). (compiled_run_eagerly:
        # torch.compiler.set_stance is new in torch 2.6; on older ones every step failed here)
        # (softmax, log_softmax, logsumexp and attention composed of plain operations: the fused
        # kernels of scaled_dot_product_attention, which nn.MultiheadAttention and
        # nn.TransformerEncoderLayer call, have no forward-mode AD, and softmax's jvp writes a
        # tensor its backward needs: a Delta-STN through any attention layer was refused, and one
        # through a softmax failed in the backward pass with "modified by an inplace operation")
        with dual_level(), linearising(), compiled_run_eagerly(), _composite_operations():
            try:
                out = self._model(*args, **kwargs)
            except RuntimeError as e:
                text = str(e)
                if type(e) not in (RuntimeError, NotImplementedError):
                    # (out of memory, a device error, the user's own kind of error: as raised. The
                    # response pass holds the tangents too, so it is the first to run out of memory;
                    # retyped, an `except torch.OutOfMemoryError` retry no longer caught it, and
                    # the message blamed the forward-mode AD of an operation)
                    raise
                if ("forward" in text.lower() and "AD" in text) or text.startswith("SelfTuning"):
                    raise  # (named by SelfTuning's step, or by the library already)
                # the base step ran the same model on the same batch: what differs here is the
                # forward-mode AD. An operation whose jvp PyTorch gets wrong failed with a message
                # naming neither (group_norm on channels_last inputs: "view size is not
                # compatible with input tensor's size and stride"), and no hint of linearize=False
                raise RuntimeError(
                    f"SelfTuning(delta=True): the model failed in the response step, whose call "
                    f"linearises the output in the perturbation with forward-mode AD, though the "
                    f"base step ran it on the same batch ({text}). An operation whose forward-mode "
                    f"AD PyTorch lacks or gets wrong can be the cause (F.group_norm / nn.GroupNorm "
                    f"on channels_last inputs, a custom autograd.Function without jvp); pass "
                    f"linearize=False, or keep such inputs contiguous"
                ) from e
            return _first_order(out)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._model, name, value)


_LOSS_INSIDE = (
    "SelfTuning(delta=True): train_loss differentiated a 0-dim output of the model that depends on "
    "the hyperparameters' perturbation: a loss computed inside the model (a Hugging Face model "
    "called with labels=..., its .loss). Delta-STN linearises the network's outputs and applies "
    "the loss to them; the first order of the loss itself is another objective (linear in the "
    "response). Compute the loss in train_loss from the model's outputs (its logits), or pass "
    "linearize=False"
)


class _RefusedInBackward(torch.autograd.Function):
    """The identity, whose backward pass raises (a loss computed inside the model: see
    :func:`_first_order`); an output nobody differentiates (a ``.loss`` train_loss ignores) is
    left alone."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        raise ValueError(_LOSS_INSIDE)


def _first_order(out: Any) -> Any:
    """Primal + tangent of every dual tensor in ``out``, followed through what ``torch.utils._pytree``
    knows (tuples, named tuples, lists, dicts of any kind, registered output classes) and through
    dataclasses, each rebuilt as its own type. A dual tensor left inside anything else would lose
    its tangent when the dual level closes (the response would silently get no gradient): that
    is refused, and so is differentiating a 0-dim output that follows the perturbation."""
    if isinstance(out, Tensor):
        primal, tangent = fwAD.unpack_dual(out)
        if tangent is not None and primal.dim() == 0 and primal.is_floating_point():
            # a loss computed inside the model (model(..., labels=y).loss): the response step
            # trained on its first order, L(f) + L'(f) J delta, instead of L(f + J delta),
            # silently (the response 3% off in 6 steps; a cross_entropy loss failed in the
            # backward pass with torch's bare "modified by an inplace operation")
            return _RefusedInBackward.apply(primal + tangent)
        return primal if tangent is None else primal + tangent
    leaves, spec = pytree.tree_flatten(out)
    if not spec.is_leaf():
        return pytree.tree_unflatten([_first_order(v) for v in leaves], spec)
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        fields = {f.name: _first_order(getattr(out, f.name)) for f in dataclasses.fields(out) if f.init}
        return dataclasses.replace(out, **fields)
    if isinstance(out, (dict, tuple, list)):  # subclasses pytree does not know
        items: Any = (
            {k: _first_order(v) for k, v in out.items()}
            if isinstance(out, dict)
            else [_first_order(v) for v in out]
        )
        try:
            return type(out)(items)
        except Exception:
            return items if isinstance(out, (dict, list)) else tuple(items)
    if not isinstance(out, nn.Module) and _holds_tensors(out):
        raise TypeError(
            f"SelfTuning(delta=True): the model returned a {type(out).__name__!r} object, whose tensors the "
            "linearisation cannot reach (their forward-mode tangents, the response's first order, "
            "would be dropped); return tensors in tuples, lists, dicts or dataclasses, or pass "
            "linearize=False"
        )
    return out


def _holds_tensors(obj: Any) -> bool:
    """Whether a plain object keeps tensors in its attributes (one level deep)."""
    attrs = getattr(obj, "__dict__", None)
    return isinstance(attrs, dict) and any(isinstance(v, Tensor) for v in attrs.values())


def _modules_with_templates(model: nn.Module) -> list[nn.Module]:
    """``model.modules()`` and the modules of every :class:`~hypergrad.nn.HyperNet`'s template
    (not submodules, but switched by ``train()`` / ``eval()``)."""
    mods = list(model.modules())
    for m in list(mods):
        if isinstance(m, HyperNet):
            mods.extend(m.base.modules())
    return mods


def _parametrized_response(layers: Sequence[tuple[str, StnLayer]]) -> list[str]:
    """The names of STN layers' parameters holding response entries
    (:meth:`~hypergrad.nn.StnLayer.response_masks`: ``hnet``, the hyper half's rows) that a
    ``torch.nn.utils.parametrize`` parametrization replaces by its own tensors, or that are no
    parameter at all (a hook computes them from another one: the older, hook-based
    ``torch.nn.utils.weight_norm`` / ``spectral_norm``, an AWD-LSTM-style weight drop), which the
    masks cannot name: Delta-STN would train them on the base objective alone (the hyper half of
    ``weight_norm``'s ``weight_v`` never moved: the base pass skips it)."""
    out = []
    for prefix, layer in layers:
        for name in layer.response_masks():
            owner, _, leaf = name.rpartition(".")
            mod = layer.get_submodule(owner) if owner else layer
            if parametrize.is_parametrized(mod, leaf) or not isinstance(
                mod._parameters.get(leaf), nn.Parameter
            ):
                out.append(f"{prefix}.{name}" if prefix else name)
    return out


@contextlib.contextmanager
def _template_not_rerun(net: HyperNet) -> Iterator[None]:
    """Within the block, a module of ``net.base`` run in a backward pass raises. HyperNet
    substitutes the generated weights for its call only: activation checkpointing
    (``torch.utils.checkpoint``) inside the base runs it again in the backward pass, after the
    call, with the template's own weights, and the gradients came out silently wrong (weights
    0.5 off after three steps, a hypergradient -0.79 for the true -0.93)."""

    def refuse(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if _in_backward():
                raise RuntimeError(
                    f"BestResponse: base.{name or '(root)'} of the HyperNet ran in the backward pass "
                    f"(activation checkpointing, torch.utils.checkpoint, recomputes it there), "
                    f"after HyperNet's call had returned: it would run with the base's template "
                    f"weights instead of the generated ones, and the gradients would be silently "
                    f"wrong. Do not checkpoint inside a HyperNet's base"
                )

        return hook

    handles = [m.register_forward_pre_hook(refuse(n)) for n, m in net.base.named_modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _self_tuned_off_domain(hp: nn.Module) -> str:
    """'' when every value of a :class:`SelfTuned` container is finite (and a ``Positive`` one > 0),
    else a sentence naming those that are not (one host read)."""
    if not isinstance(hp, SelfTuned):
        return ""
    with torch.no_grad():
        values = hp.values_of(hp.raw.detach())
    return _values_off_domain([(n, values[n], isinstance(s, Positive)) for n, s in hp.specs.items()])


class _BestResponseBase(HyperOptimizer):
    """What SelfTuning and BestResponse share: draws, eval-mode validation, history, state."""

    hparams: SelfTuned
    _train_mode = _Mode.TRAIN

    def __init__(
        self,
        model: nn.Module,
        hparams: nn.Module,
        train_loss: LossFn,
        val_loss: LossFn,
        *,
        inner_optimizer: torch.optim.Optimizer,
        outer_optimizer: torch.optim.Optimizer,
        entropy_weight: float,
        warmup: int,
        train_steps: int,
        val_steps: int,
        on_nonfinite: OnNonFinite | str,
        divergence: float | None,
    ) -> None:
        super().__init__(
            model,
            hparams,
            train_loss,
            val_loss,
            inner_optimizer=inner_optimizer,
            outer_optimizer=outer_optimizer,
            on_nonfinite=on_nonfinite,
            divergence=divergence,
        )
        name = type(self).__name__
        if not isinstance(hparams, SelfTuned):
            raise TypeError(
                f"{name} needs hparams = hg.hparams.SelfTuned(...) (named Rate / Positive / Integer "
                f"specs), got {type(hparams).__name__}"
            )
        for arg, v, low in (
            ("warmup", warmup, 0),
            ("train_steps", train_steps, 1),
            ("val_steps", val_steps, 1),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"Invalid {arg}: {v!r} (need an int >= {low})")
        _check_entropy_weight(entropy_weight)
        self.entropy_weight = float(entropy_weight)
        self.warmup, self.train_steps, self.val_steps = warmup, train_steps, val_steps
        self._checked_key: tuple[int, ...] | None = None  # trained weights whose response was checked
        # the validation phase in progress: (inner step it belongs to, hypersteps taken in it)
        self._phase: tuple[int, int] = (-1, 0)

    def _response_params(self) -> list[tuple[str, Tensor]]:
        """The parameters that map the hyperparameters to the weights (the response)."""
        raise NotImplementedError

    def _drawing_changed(self) -> str:
        """What another SelfTuning / BestResponse built on ``hparams`` since changed in how the
        container draws for this object ('' if nothing)."""
        return ""

    def _check_drawing(self) -> None:
        """Raise if another SelfTuning / BestResponse built on ``hparams`` after this one set the
        container's drawing (Delta-STN's centred features, BestResponse's sampling prior) for
        itself: this object's steps and hypergradients would silently draw as that one's. A few
        attribute reads."""
        changed = self._drawing_changed()
        if not changed:
            return
        name = type(self).__name__
        raise ValueError(
            f"{name}: another SelfTuning / BestResponse was built on this hparams container after "
            f"this {name} and set how it draws for itself ({changed}): this {name}'s steps and "
            f"hypergradients would silently draw as that one's. Go on with the newer object only, "
            f"or give each its own container and model (copy.deepcopy); to go back to this "
            f"configuration, build a new {name} on them"
        )

    def _before_step(self) -> None:
        key = self._weights_key
        if key == self._checked_key:
            return
        trained = {id(p) for p in _params_of(self.inner_optimizer)}
        idle = [n for n, p in self._response_params() if p.requires_grad and id(p) not in trained]
        if idle:
            raise ValueError(
                f"{type(self).__name__}: inner_optimizer does not train {idle[:4]}, which map the "
                "hyperparameters to the weights: the best response would never be learned and the "
                "hypergradient would follow a random map. Give inner_optimizer model.parameters() "
                "(or call requires_grad_(False) on them if they are frozen on purpose)"
            )
        self._checked_key = key

    def step(
        self, batch: Batch, *, max_grad_norm: float | None = None, scaler: torch.amp.GradScaler | None = None
    ) -> Tensor:
        """One inner step on ``train_loss`` with freshly perturbed hyperparameters (the draws in
        the loss are detached from :math:`\\lambda`, :math:`\\sigma`); see
        :meth:`HyperOptimizer.step` (and its ``max_grad_norm`` and ``scaler``)."""
        self._check_drawing()
        with self.hparams._drawing(self._train_mode):
            return super().step(batch, max_grad_norm=max_grad_norm, scaler=scaler)

    def hyper_due(self) -> bool:
        """Whether the schedule calls for a hyperstep now: in the validation phase that follows
        ``warmup`` inner steps and then every ``train_steps`` ones, until that phase has taken its
        ``val_steps`` hypersteps (skipped ones count). So ``while hopt.hyper_due():
        hopt.hyper_step(...)`` takes the whole phase, and resumes it where a checkpoint taken
        inside it left off (the count is saved by :meth:`state_dict`); ``if hopt.hyper_due():``
        after each inner step takes one hyperstep per phase.

        >>> import torch, hypergrad as hg
        >>> hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9))
        >>> net = hg.nn.StnLinear(4, 3, hp.size)
        >>> loss = lambda m, h, b: torch.nn.functional.cross_entropy(m(b[0], h), b[1])
        >>> hopt = hg.SelfTuning(net, hp, loss, loss, train_steps=1, val_steps=3,
        ...     inner_optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        ...     outer_optimizer=torch.optim.Adam(hp.parameters(), lr=1e-2))
        >>> b = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> _ = hopt.step(b)
        >>> n = 0
        >>> while hopt.hyper_due():
        ...     _ = hopt.hyper_step(val_batch=b); n += 1
        >>> n
        3
        """
        n = self.inner_steps
        if not (n >= max(self.warmup, 1) and (n - self.warmup) % self.train_steps == 0):
            return False
        at, taken = self._phase
        return at != n or taken < self.val_steps

    @torch.compiler.disable  # (as HyperOptimizer.hyper_step: never traced)
    def hyper_step(self, train_batch: Batch = None, val_batch: Batch = None) -> HyperStepInfo:
        from ._marglik import _restore_optimizer, _snapshot_optimizer

        # a huge but finite hypergradient takes a Positive(transform="exp") value to exp(1e4) = inf
        # (or 0): the raw values stay finite, so the outer step was accepted (its history row read
        # inf) and every later step was refused (a non-finite loss) with a message that named no
        # hyperparameter. Kept (the few raw values, the outer state) so that it can be undone
        hp = self.hparams
        tensors = list(hp.parameters())
        kept = [p.detach().clone() for p in tensors], [p.grad for p in tensors]
        outer, rng, start = _snapshot_optimizer(self.outer_optimizer), self._rng_state(), self.hyper_steps
        rows, attributes = len(getattr(hp, "_history", ())), self._attributes_now()
        info = super().hyper_step(train_batch, val_batch)  # (an error raised takes no turn)
        bad = "" if info.skipped else _self_tuned_off_domain(hp)
        if bad:
            with torch.no_grad():
                for p, v, g in zip(tensors, *kept, strict=True):
                    p.copy_(v)
                    p.grad = g
            _restore_optimizer(self.outer_optimizer, outer)
            self._set_rng_state(rng)
            _put_attributes_back(attributes)
            del hp._history[rows:]
            self.hyper_steps = start
            self._nonfinite(f"hyper step {start}: the outer optimiser's step made {bad}")
            info = dataclasses.replace(info, skipped=True, hyper_steps=start)
        at, taken = self._phase
        self._phase = (self.inner_steps, taken + 1 if at == self.inner_steps else 1)
        return info

    hyper_step.__doc__ = HyperOptimizer.hyper_step.__doc__

    def _check_hyper_batches(self, train_batch: Batch, val_batch: Batch) -> None:
        name = type(self).__name__
        call = getattr(self, "_calling", "hyper_step")  # (or hypergradient: the call made)
        if val_batch is None:
            # (hyper_step(batch): the batch is train_batch, the first positional argument)
            hint = (
                f"; the one batch given was taken as train_batch, {call}'s first positional "
                f"argument, which {name} does not use: pass {call}(val_batch=batch)"
                if train_batch is not None
                else ""
            )
            raise ValueError(f"{name}.{call} needs val_batch=... (a validation batch for val_loss){hint}")
        check_batch(val_batch, "val_batch", self.device, self.dtype, dtypes=False)
        if train_batch is not None:  # not used, but a wrong one is still a bug worth naming
            check_batch(train_batch, "train_batch", self.device, self.dtype, dtypes=False)

    def _val_closure(self, val_batch: Batch) -> Callable[[], Tensor]:
        pair = self.pair
        buffers = pair.buffers()

        def lv() -> Tensor:
            model, hp = self.model, self.hparams
            was = [(m, m.training) for m in _modules_with_templates(model)]
            model.eval()  # no dropout or augmentation in the validation step
            before = self._rng_state()
            hp._draws = []
            try:
                with hp._drawing(self._val_mode()), validating():
                    out = pair.loss(self.val_loss, val_batch, buffers=clone_all(buffers))
                draws = hp._draws
            finally:
                hp._draws = None
                for m, t in was:
                    m.training = t
            self._check_val_rng(before, draws)
            return out

        return lv

    def _check_val_rng(self, before: dict[str, Tensor], draws: list[tuple[int, Any, Any]]) -> None:
        """Warn (once) when the validation pass drew random numbers besides the perturbations:
        functional dropout left on (``F.dropout(h, p)``, whose ``training`` defaults to True, in a
        model that is in eval mode there) made every hypergradient a random draw, silently (three
        calls at ``perturb_val=False`` gave 0.0025, 0.0010, 0.0041). The perturbations' own draws
        are replayed from ``before`` to find the state they alone leave."""
        if getattr(self, "_warned_random_val", False):
            return
        after = self._rng_state()
        self._set_rng_state(before)
        for n, dtype, device in draws:
            torch.randn(n, self.hparams.size, dtype=dtype, device=device)
        expected = self._rng_state()
        self._set_rng_state(after)
        if all(torch.equal(after[k], expected[k]) for k in after):
            return
        self._warned_random_val = True
        warnings.warn(
            f"{type(self).__name__}: the validation pass drew random numbers of its own (besides "
            f"the hyperparameters' perturbations), though it runs the model in eval mode: "
            f"functional dropout such as F.dropout(h, p), whose training argument defaults to "
            f"True, or noise not following self.training, makes every hypergradient a random "
            f"draw. Pass training=self.training (warned once)",
            RuntimeWarning,
            stacklevel=2,
        )

    def _val_mode(self) -> _Mode:
        return _Mode.VAL

    def _hypergradient(self, train_batch: Batch, val_batch: Batch) -> _Hypergradient:
        self._check_drawing()
        grads, lv, reached = selftuning_hypergradient(
            self._val_closure(val_batch), self.hparams, self.entropy_weight
        )
        if self.ranks.size > 1:  # data parallel: the mean over the ranks' validation shards
            grads = tuple(g.contiguous() for g in grads)  # (autograd may give expanded ones)
            self.ranks.mean_([*grads, lv])
        hp = self.hparams

        def commit() -> None:
            hp._record(self.inner_steps, self.hyper_steps + 1)

        return _Hypergradient(grads, lv, reached=tuple(bool(r) for r in reached), commit=commit)

    def _method_state(self) -> dict[str, Any]:
        return {**_state(self.hparams), "phase": list(self._phase)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        method = state.get("method") if isinstance(state, dict) else None
        if isinstance(method, dict):
            # (before the containers load: SelfTuned's own check knows the saved specs by a code
            # only, and would refuse them without naming them)
            check_config(self.hparams, method)
        super().load_state_dict(state)

    load_state_dict.__doc__ = HyperOptimizer.load_state_dict.__doc__

    def _load_method_state(self, state: dict[str, Any]) -> None:
        _load_state(self.hparams, state)
        phase = state.get("phase")  # (states saved before it was recorded: a fresh phase)
        self._phase = (int(phase[0]), int(phase[1])) if phase is not None else (-1, 0)


class SelfTuning(_BestResponseBase):
    r"""Self-tuning networks (MacKay et al. 2019), and Delta-STN's centred form (Bae & Grosse 2020).

    The model is built from ``hg.nn`` STN layers (:class:`~hypergrad.nn.StnLinear`,
    :class:`~hypergrad.nn.StnConv2d`, ...), each fed the hyperparameters; their weights and
    response maps together are :math:`\phi` and train with ``inner_optimizer``.

    * :meth:`step` (the T_train phase, one call per step): one inner step on ``train_loss`` with
      per-example perturbed hyperparameters :math:`\tilde\lambda_i = \lambda + \sigma\epsilon_i`
      (what ``hparams.draw`` returns inside the loss; dropout and augmentation use their values).
    * :meth:`hyper_step` (the T_val phase): one outer step on
      :math:`L_V(\hat w_\phi(\lambda + \sigma\epsilon)) - \tau \sum_j \log\sigma_j` with the
      model in **eval mode** (no dropout, no augmentation), so :math:`\lambda` reaches the
      validation loss only through the layers' best response. Needs ``val_batch`` only. Its
      perturbation :math:`\epsilon` is drawn from torch's global RNG (as :meth:`hypergradient`'s
      is): a hyperstep advances it, like a training step, so that its noise is independent of the
      next step's.
    * :meth:`hyper_due` says when the schedule wants the T_val phase (after ``warmup`` inner
      steps, then every ``train_steps``); ``val_steps`` is how many hypersteps that phase takes.

    Cost per hyperstep: one validation forward/backward. Per inner step: that of the network
    with the STN layers (about 2x the matmul FLOPs of the ordinary layers).

    Args:
        model: a model containing at least one STN layer, each with ``n_hparams == hparams.size``.
        hparams: a :class:`~hypergrad.hparams.SelfTuned` (learn its scale for the entropy term).
        train_loss, val_loss: ``loss(model, hparams, batch)``; call the model as
            ``model(x, hparams)`` (or draw once with ``hparams.draw(len(x))`` and pass the
            draw), and read the values, e.g. ``hparams.draw(len(x))["dropout"]``.
        inner_optimizer, outer_optimizer, on_nonfinite, divergence: see :class:`HyperOptimizer`.
        entropy_weight: :math:`\tau` (default: 1e-3).
        delta: Delta-STN (Bae & Grosse 2020) (default: False). The layers see the centred
            perturbation :math:`\Delta = \tilde\lambda - \lambda` (a stop-gradient
            :math:`\lambda`), so that :math:`\hat w_\phi(\lambda) = w_0`, and each
            :meth:`step` trains the two parts of :math:`\phi` on their own objectives, from
            two forward/backward passes and one step of ``inner_optimizer``:

            * the base weights :math:`w_0` (the layers' ordinary halves, and every weight
              outside the STN layers) on ``train_loss`` at the current, unperturbed
              :math:`\lambda` (:math:`\Delta = 0`; dropout etc. at :math:`\lambda`);
            * the best response :math:`\Phi` (the response maps ``hnet`` and the layers'
              hyper halves, :meth:`~hypergrad.nn.StnLayer.response_masks`) on ``train_loss`` at
              per-example perturbed :math:`\tilde\lambda` with the network's output
              *linearised* in the perturbation, :math:`f(x; w_0) + J_\Delta f(x; w_0)\,\Delta`
              (a forward-mode JVP inside the model call; ``linearize=False`` keeps the output as
              it is). A layer fed the draw's features as a tensor (``layer(x, d.features)``) is
              linearised like one fed the draw. The model may return tensors in tuples, named
              tuples, lists, dicts and dataclasses (each comes back as its own type); another
              object holding tensors is refused with a ``TypeError``, since their tangents
              would be lost.

            Both gradients are taken at the same weights and applied in one optimiser step (the
            paper steps :math:`w_0` first); the returned loss is the base one, and running
            statistics (BatchNorm) are updated once, by the base pass. Cost per
            step: about 2x an STN step (3x with the JVP). The hyperstep is the STN's, on the
            centred features. ``train_loss`` is called twice per step on the same batch, so
            what it keeps for the next batch (an RNN's hidden state) is kept twice, the
            response pass's last: pass the state a batch starts from inside the batch, as
            ``step((x, y, h0, c0))``, and keep the new one from either pass. The response pass
            gets a copy of the batch as the base pass received it (a loss may change its batch in
            place, or pop entries from it).
        linearize: with ``delta``, linearise the output in the response step (default: True;
            needs forward-mode AD support for the model's operations; softmax, log_softmax,
            logsumexp and ``F.scaled_dot_product_attention``, which ``nn.MultiheadAttention`` and
            ``nn.TransformerEncoderLayer`` call, run composed of plain operations there, since
            torch's kernels have no usable forward-mode derivative; calls bound before the step,
            ``from torch.nn.functional import softmax``, are not swapped).
        warmup, train_steps, val_steps: the schedule :meth:`hyper_due` follows
            (default: 0, 2, 1 — the paper's T_train = 2, T_val = 1).
        perturb_val: take the validation steps at perturbed :math:`\lambda + \sigma\epsilon`
            (default: True, the paper's Algorithm 1, which :math:`\sigma` needs to learn);
            ``False``: at :math:`\lambda` itself, as the authors' code does when it does not
            tune the scales (their default), with ``SelfTuned(..., learn_scale=False)`` only
            (``ValueError`` otherwise: a learned :math:`\sigma` would see only the entropy term).

    Raises:
        TypeError: ``hparams`` not a ``SelfTuned``; ``delta`` or ``linearize`` not a bool.
        ValueError: no STN layer in ``model``; a layer's ``n_hparams`` different from
            ``hparams.size``; bad schedule or entropy weight; with ``delta``, an STN layer whose
            ``hnet``, weight or bias is parametrized (``torch.nn.utils.parametrize``: its response
            entries cannot be trained apart). At the first :meth:`step`: an
            ``inner_optimizer`` that does not train the response parameters (``hnet``, the hyper
            halves). At :meth:`hyper_step`: no ``val_batch``.
        RuntimeError: with ``delta`` and ``linearize``, an operation of the model without
            forward-mode AD support, or activation checkpointing (``torch.utils.checkpoint``)
            inside the model, whose recomputation in the backward pass cannot repeat the
            linearised forward (pass ``linearize=False``).
        TypeError: with ``delta`` and ``linearize``, a model output whose tensors cannot be
            reached (see ``delta``).

    >>> import torch, hypergrad as hg
    >>> hp = hg.hparams.SelfTuned(dropout=hg.hparams.Rate(0.2, high=0.9))
    >>> class Net(torch.nn.Module):
    ...     def __init__(self, n):
    ...         super().__init__()
    ...         self.l1, self.l2 = hg.nn.StnLinear(4, 16, n), hg.nn.StnLinear(16, 3, n)
    ...     def forward(self, x, hp):
    ...         d = hp.draw(len(x))                   # one draw per batch, shared by all layers
    ...         h = torch.relu(self.l1(x, d))
    ...         return self.l2(hg.nn.dropout(h, d["dropout"], self.training), d)
    >>> model = Net(hp.size)
    >>> loss = lambda m, h, b: torch.nn.functional.cross_entropy(m(b[0], h), b[1])
    >>> hopt = hg.SelfTuning(model, hp, loss, loss,
    ...     inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    ...     outer_optimizer=torch.optim.Adam(hp.parameters(), lr=3e-3))
    >>> b = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    >>> _ = hopt.step(b); _ = hopt.step(b)
    >>> hopt.hyper_due()
    True
    >>> info = hopt.hyper_step(val_batch=b)
    >>> sorted(hp.history()[0])
    ['dropout', 'hyper_step', 'inner_step', 'sigma.dropout']
    """

    def __init__(
        self,
        model: nn.Module,
        hparams: nn.Module,
        train_loss: LossFn,
        val_loss: LossFn,
        *,
        inner_optimizer: torch.optim.Optimizer,
        outer_optimizer: torch.optim.Optimizer,
        entropy_weight: float = 1e-3,
        delta: bool = False,
        linearize: bool = True,
        warmup: int = 0,
        train_steps: int = 2,
        val_steps: int = 1,
        perturb_val: bool = True,
        on_nonfinite: OnNonFinite | str = OnNonFinite.RAISE,
        divergence: float | None = None,
    ) -> None:
        super().__init__(
            model,
            hparams,
            train_loss,
            val_loss,
            inner_optimizer=inner_optimizer,
            outer_optimizer=outer_optimizer,
            entropy_weight=entropy_weight,
            warmup=warmup,
            train_steps=train_steps,
            val_steps=val_steps,
            on_nonfinite=on_nonfinite,
            divergence=divergence,
        )
        if not isinstance(perturb_val, bool):
            raise TypeError(f"SelfTuning: perturb_val must be a bool, got {perturb_val!r}")
        if not perturb_val and self.hparams.learn_scale:
            raise ValueError(
                "SelfTuning(perturb_val=False) takes the validation steps at the unperturbed "
                "hyperparameters, where the validation loss does not depend on the perturbation "
                "scale: a learned scale would get the entropy term's gradient only and grow to its "
                "upper bound. Use hg.hparams.SelfTuned(..., learn_scale=False, scale=...) with it"
            )
        self.perturb_val = perturb_val
        layers = stn_layers(model)
        if not layers:
            raise ValueError(
                "SelfTuning: model has no STN layers (hg.nn.StnLinear, StnConv1d, StnConv2d, "
                "StnLSTMCell), so the hyperparameters cannot reach the validation loss; build the "
                "model from them (or use hg.BestResponse with hg.nn.HyperNet)"
            )
        size = self.hparams.size
        bad = [f"{n or 'model'} (n_hparams={m.n_hparams})" for n, m in layers if m.n_hparams != size]
        if bad:
            raise ValueError(
                f"SelfTuning: hparams.size is {size} but these STN layers were built for another "
                f"number of hyperparameters: {', '.join(bad)}"
            )
        # (bool() of a string: delta="false", as a config file or a sweep gives it, was Delta-STN)
        for arg, flag in (("delta", delta), ("linearize", linearize)):
            if not isinstance(flag, bool):
                raise TypeError(f"SelfTuning: {arg} must be True or False, got {flag!r}")
        self.delta = delta
        self.linearize = linearize
        if self.delta:
            hidden = _parametrized_response(layers)
            if hidden:
                raise ValueError(
                    f"SelfTuning(delta=True) trains the response entries of {hidden[:4]} (the "
                    f"response map, the hyper half's rows) on another objective than the base "
                    f"weights, but a "
                    f"torch.nn.utils.parametrize parametrization (weight_norm, spectral_norm, "
                    f"orthogonal, ...), or a hook that computes them from another parameter "
                    f"(the older torch.nn.utils.weight_norm / spectral_norm, a weight-drop "
                    f"wrapper), hides them behind other tensors (they would "
                    f"silently never train): reparametrize ordinary layers only, or use "
                    f"delta=False"
                )
        if self.delta and any(d.static_graph for d in ddp_wrappers(model)):
            raise ValueError(
                "SelfTuning(delta=True) runs two backward passes per step, which a "
                "DistributedDataParallel model with static_graph=True cannot take: wrap it without "
                "static_graph"
            )
        self.hparams._centred = self.hparams._centred_by = self.delta
        if self.delta and self.linearize:
            from ._unrolled import _load_forward_ad

            _load_forward_ad()

    def _drawing_changed(self) -> str:
        centred = bool(getattr(self.hparams, "_centred", self.delta))
        if centred == self.delta:
            return ""
        return (
            f"its layers are fed {'centred' if centred else 'uncentred'} features, this "
            f"SelfTuning(delta={self.delta}) trained on {'centred' if self.delta else 'uncentred'} ones"
        )

    def _val_mode(self) -> _Mode:
        # (perturb_val=False: unperturbed, values differentiable through the best response)
        return _Mode.VAL if self.perturb_val else _Mode.VAL_MEAN

    def _averages_by_hand(self) -> bool:
        # Delta-STN: two backward passes per step (base, response), averaged together afterwards
        return super()._averages_by_hand() or (self.delta and self.ranks.size > 1)

    def _response_params(self) -> list[tuple[str, Tensor]]:
        masks = response_masks(self.ranks.module)
        return [(n, p) for n, p in self.ranks.module.named_parameters() if masks.get(id(p)) is True]

    def _method_state(self) -> dict[str, Any]:
        state = super()._method_state()
        state["delta"] = self.delta
        return state

    def _load_method_state(self, state: dict[str, Any]) -> None:
        if "delta" in state and bool(state["delta"]) != self.delta:
            raise ValueError(
                f"this state_dict was saved by SelfTuning(delta={bool(state['delta'])}), loaded into "
                f"delta={self.delta}: its layers were trained on "
                f"{'centred' if state['delta'] else 'uncentred'} hyperparameter features, so they "
                f"would compute another function here; build SelfTuning with delta={bool(state['delta'])}"
            )
        super()._load_method_state(state)

    def _train_backward(self, batch: Batch, weights: Sequence[Tensor], model: Any = None) -> Tensor:
        if not self.delta:
            return super()._train_backward(batch, weights, model)
        hp, model = self.hparams, self.model if model is None else model
        # the response pass gets the batch as the base pass received it: a train_loss that changes
        # its batch in place (x.mul_(2), BERT's masking of the token ids, batch.pop("labels"))
        # handed the response pass the batch the base pass left (its weights 1.7% off after 3
        # steps, silently; a KeyError for a popped entry). One copy of the batch per step, used
        # where the base pass changed the batch's tensors (their identities or version counters)
        pristine, seen = clone_batch(batch), batch_versions(batch)
        with hp._drawing(_Mode.BASE):  # w0 at the current lambda
            loss = super()._train_backward(batch, weights, model)
        base = [w.grad for w in weights]
        for w in weights:
            w.grad = None
        if self.linearize and self.ranks.size > 1 and model is self.model:
            # the bare module: DistributedDataParallel's forward wraps the outputs in its _DDPSink
            # (under find_unused_parameters=True), an autograd.Function without a jvp, so the
            # linearised call failed; the reducer is off in this step (no_sync: the gradients are
            # averaged by hand) and the base pass synced the buffers, so the wrapper adds nothing
            model = self.ranks.module
        model = _Linearised(model) if self.linearize else model
        # the response pass must not update the running statistics a second time (BatchNorm):
        # the step's statistics are those of the base pass, the model at the current lambda
        after_base = self.pair.snapshot_buffers()
        masks = response_masks(self.model)
        # the response at perturbed lambdas
        with hp._drawing(_Mode.LINEAR if self.linearize else _Mode.TRAIN):
            try:
                # the copy unless the batch carries an autograd graph (a tensor computed from the
                # hyperparameters, whose path only the original keeps) and the base pass left its
                # tensors as they were: the base pass may also change its batch where no version
                # counter sees it (a NumPy array normalised in place, ``x.data.div_(255)``), and
                # the response pass then trained on x / 255**2, silently. (The copy is made anyway)
                changed = seen != batch_versions(batch)
                graph = any(t.grad_fn is not None for t in iter_tensors(batch))
                # parameters outside inner_optimizer (a second optimiser's) get the base pass's
                # gradient, the model's at the current lambda, as plain backward() gives it; the
                # response pass added its own on top (twice the gradient, at perturbed lambdas).
                # Those holding response entries (an STN layer's weight, whose hyper half's rows
                # the base pass multiplies by 0) get the response pass's gradient there, as the
                # trained weights do: they got 0 there, and the hyper half never trained, silently
                left = getattr(self, "_left_now", [])
                mixed = [p for p in left if id(p) in masks] if left else []
                mixed_base = [p.grad for p in mixed]
                for p in mixed:
                    p.grad = None
                self._left_now = mixed
                try:
                    response = super()._train_backward(
                        batch if graph and not changed else pristine, weights, model
                    )
                finally:
                    self._left_now = left
            except RuntimeError as e:
                if self.linearize and isinstance(e, CheckpointError):
                    raise RuntimeError(
                        "SelfTuning(delta=True): activation checkpointing (torch.utils.checkpoint) "
                        "recomputes part of the model in the backward pass, after the linearised "
                        "model call has returned and its forward-mode tangents are gone, so the "
                        "recomputation differs from the forward it replaces (torch raised its "
                        "CheckpointError, chained below); pass "
                        "linearize=False (checkpointing works there), or do not checkpoint inside "
                        "the model"
                    ) from e
                if (
                    self.linearize
                    and type(e) in (RuntimeError, NotImplementedError)
                    and "forward" in str(e).lower()
                    and "AD" in str(e)
                ):
                    raise RuntimeError(
                        f"SelfTuning(delta=True): an operation of the model does not support the "
                        f"forward-mode AD that linearises its output ({e}). A custom "
                        f"autograd.Function without jvp, or a module hook registered with "
                        f"register_full_backward_hook (it runs one), can be the cause; "
                        f"pass linearize=False"
                    ) from e
                raise
            finally:
                self.pair.restore_buffers(after_base)
        for w, gb in zip([*weights, *mixed], [*base, *mixed_base], strict=True):
            gr, mask = w.grad, masks.get(id(w))
            if mask is None:
                w.grad = gb
            elif isinstance(mask, bool) or (gb is None and gr is None):
                pass  # all of it is response: keep gr
            else:
                gb = torch.zeros_like(w) if gb is None else gb
                gr = torch.zeros_like(w) if gr is None else gr
                w.grad = torch.where(mask, gr, gb)
        # a non-finite response loss refuses the step like a non-finite base loss (no sync here)
        return loss.detach() + 0.0 * response.detach()


class BestResponse(_BestResponseBase):
    r"""Best-response hypernetworks (Lorraine & Duvenaud 2018).

    ``model`` is a :class:`~hypergrad.nn.HyperNet` that generates a base model's weights from
    the hyperparameters (linear, low-rank, or any architecture given to it); its parameters are
    :math:`\phi`. The losses call ``model(x, hparams=hparams)`` (and may read
    ``model.weights(hparams)`` for a penalty, and ``hparams.draw(1)[name]`` for values): one
    :math:`\lambda` per batch.

    * :meth:`step`: one inner step on ``train_loss`` at a sampled :math:`\tilde\lambda`:
      ``sampling="local"`` draws :math:`\tilde\lambda \sim N(\lambda, \sigma^2)` around the current
      value (the fixed scale of ``SelfTuned(..., learn_scale=False, scale=...)``);
      ``sampling="global"`` draws from a fixed prior :math:`N(\lambda_0, s_p^2)` around the initial
      value (``prior_scale`` :math:`s_p`), so the hypernetwork learns the response over the whole
      region first (train it for ``warmup`` steps before the hypersteps).
    * :meth:`hyper_step`: one outer step on :math:`L_V(w_\phi(\lambda))` (eval mode, no
      perturbation). Needs ``val_batch`` only.

    Cost per inner step: one forward/backward of ``base`` plus the hypernetwork's
    (:class:`~hypergrad.nn.HyperNet`); per hyperstep: one validation forward/backward.

    Args:
        model: a :class:`~hypergrad.nn.HyperNet` with ``n_hparams == hparams.size``, maybe
            wrapped by ``torch.compile`` (whose wrapper passes ``weights`` on) or a data-parallel
            wrapper (which does not: :meth:`step` passes the losses the wrapper, hypersteps the
            bare HyperNet, so a loss calling ``model.weights`` looks through it, e.g.
            ``getattr(model, "module", model).weights(h)``).
        hparams: ``SelfTuned(..., learn_scale=False)``.
        train_loss, val_loss: as in :class:`SelfTuning`: ``loss(model, hparams, batch)``.
        sampling: ``"local"`` (default) or ``"global"``.
        prior_scale: :math:`s_p` for global sampling (default: 1.0).
        warmup, train_steps, val_steps, inner_optimizer, outer_optimizer, on_nonfinite,
            divergence: as in :class:`SelfTuning`, but ``train_steps`` defaults to 1 (defaults:
            0, 1, 1).

    Raises:
        TypeError: ``hparams`` not a ``SelfTuned``.
        ValueError: ``model`` not a :class:`~hypergrad.nn.HyperNet` (bare or wrapped), its
            ``n_hparams`` different from ``hparams.size``; ``hparams`` that learn their scale;
            an unknown ``sampling``, ``prior_scale`` not a finite number > 0, or a bad
            schedule. At the first :meth:`step`: an ``inner_optimizer`` that does not train the
            hypernetwork. At :meth:`hyper_step`: no ``val_batch``.
        RuntimeError: at :meth:`step` (nothing changed), a module of the base run again in the
            backward pass by activation checkpointing (``torch.utils.checkpoint``): it would use
            the template's weights, not the generated ones. (Hypersteps keep the activations of
            checkpointed blocks instead, as every hypergradient does.)

    >>> import torch, hypergrad as hg
    >>> hp = hg.hparams.SelfTuned(decay=hg.hparams.Positive(0.1, transform="exp"), learn_scale=False)
    >>> net = hg.nn.HyperNet(torch.nn.Linear(3, 1, bias=False), hp.size)
    >>> def train(m, h, b):
    ...     w = m.weights(h)["weight"]
    ...     return ((m(b[0], hparams=h) - b[1]) ** 2).mean() + h.draw(1)["decay"][0] * (w ** 2).sum()
    >>> val = lambda m, h, b: ((m(b[0], hparams=h) - b[1]) ** 2).mean()
    >>> hopt = hg.BestResponse(net, hp, train, val,
    ...     inner_optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
    ...     outer_optimizer=torch.optim.Adam(hp.parameters(), lr=1e-2))
    >>> b = (torch.randn(16, 3), torch.randn(16, 1))
    >>> _ = hopt.step(b)
    >>> hopt.hyper_step(val_batch=b).hyper_steps
    1
    """

    _train_mode = _Mode.SHARED_TRAIN

    def __init__(
        self,
        model: nn.Module,
        hparams: nn.Module,
        train_loss: LossFn,
        val_loss: LossFn,
        *,
        inner_optimizer: torch.optim.Optimizer,
        outer_optimizer: torch.optim.Optimizer,
        sampling: str = "local",
        prior_scale: float = 1.0,
        warmup: int = 0,
        train_steps: int = 1,
        val_steps: int = 1,
        on_nonfinite: OnNonFinite | str = OnNonFinite.RAISE,
        divergence: float | None = None,
    ) -> None:
        super().__init__(
            model,
            hparams,
            train_loss,
            val_loss,
            inner_optimizer=inner_optimizer,
            outer_optimizer=outer_optimizer,
            entropy_weight=0.0,
            warmup=warmup,
            train_steps=train_steps,
            val_steps=val_steps,
            on_nonfinite=on_nonfinite,
            divergence=divergence,
        )
        bare = self.ranks.module  # (through DistributedDataParallel / torch.compile wrappers)
        if not isinstance(bare, HyperNet):
            raise ValueError(
                f"BestResponse: model must be a hg.nn.HyperNet (a hypernetwork generating a model's "
                f"weights), got {type(bare).__name__}"
            )
        if bare.n_hparams != self.hparams.size:
            raise ValueError(
                f"BestResponse: the HyperNet was built for n_hparams={bare.n_hparams} but "
                f"hparams.size is {self.hparams.size}"
            )
        if self.hparams.learn_scale:
            raise ValueError(
                "BestResponse keeps the sampling scale fixed: build the hyperparameters with "
                "hg.hparams.SelfTuned(..., learn_scale=False, scale=...)"
            )
        if sampling not in ("local", "global"):
            raise ValueError(f"Invalid sampling: {sampling!r} (need 'local' or 'global')")
        if not (
            isinstance(prior_scale, (int, float))
            and not isinstance(prior_scale, bool)
            and math.isfinite(prior_scale)
            and prior_scale > 0
        ):
            raise ValueError(f"Invalid prior_scale: {prior_scale!r} (need a finite number > 0)")
        self.sampling = sampling
        self.hparams._centred = self.hparams._centred_by = False  # (the hypernetwork is fed lambda)
        if sampling == "global":
            raw = self.hparams.raw.detach().clone()
            self.hparams._prior = (raw, torch.full_like(raw, float(prior_scale)))
        else:
            self.hparams._prior = None
        self._own_prior = self.hparams._prior  # (the very tuple: another object's is another one)

    def _drawing_changed(self) -> str:
        hp = self.hparams
        if getattr(hp, "_centred", False):
            return "its STN layers are fed centred features (SelfTuning(delta=True)), the hypernetwork lambda"
        mine = self.__dict__.get("_own_prior", hp._prior)  # (objects pickled before it was kept)
        if hp._prior is mine:
            return ""
        if hp._prior is None or mine is None:
            was, now = ("global", "local") if hp._prior is None else ("local", "global")
            return f"its sampling is now {now!r}, this BestResponse's {was!r}"
        return "its global sampling prior is now centred on that object's starting values, not this one's"

    def _val_mode(self) -> _Mode:
        return _Mode.VAL_MEAN  # (unperturbed; values differentiable, for a val_loss that reads them)

    def _train_backward(self, batch: Batch, weights: Sequence[Tensor], model: Any = None) -> Tensor:
        # (the hypergradient's closure keeps the activations of checkpointed blocks instead:
        # FunctionalPair.call's differentiable_twice)
        assert isinstance(self.ranks.module, HyperNet)
        with _template_not_rerun(self.ranks.module):
            return super()._train_backward(batch, weights, model)

    def _response_params(self) -> list[tuple[str, Tensor]]:
        return [(n, p) for n, p in self.ranks.module.named_parameters() if n != "base_weights"]

    def _method_state(self) -> dict[str, Any]:
        state = super()._method_state()  # (history, specs and the validation phase in progress)
        state["prior"] = self.hparams._prior
        state["sampling"] = self.sampling
        return state

    def _load_method_state(self, state: dict[str, Any]) -> None:
        saved = state.get("sampling", "global" if state.get("prior") is not None else "local")
        if "prior" in state and saved != self.sampling:
            effect = "dropped" if saved == "local" else "imposed"
            raise ValueError(
                f"this state_dict was saved by BestResponse(sampling={saved!r}), loaded into "
                f"sampling={self.sampling!r} (a global prior would be {effect}); "
                f"build BestResponse with sampling={saved!r}"
            )
        super()._load_method_state(state)
        if "prior" in state:
            prior = state["prior"]
            raw = self.hparams.raw  # (a checkpoint mapped to another device, or saved from one)
            self.hparams._prior = (
                None if prior is None else (prior[0].to(raw, copy=True), prior[1].to(raw, copy=True))
            )
            self._own_prior = self.hparams._prior
