"""LoRA and LoRA+ layers.

LoRA (Hu et al., 2021) keeps ``W0`` frozen and learns a rank-``r`` update::

    y = x W0^T + b + s * (dropout(x) A^T) B^T,    s = alpha / r   (rsLoRA: alpha / sqrt(r))

with ``A`` of shape (r, in) and ``B`` of shape (out, r). ``B`` starts at zero, so a fresh layer
computes exactly what its base computes.
"""

from __future__ import annotations

import contextvars
import difflib
import functools
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from numbers import Integral, Real
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from . import _row_blocks
from ._devices import LAYER_DTYPES, is_layer_dtype
from ._row_blocks import RowBlocks
from ._warnings import warn as _warn
from .adapter import (
    AdapterMixin,
    autocast_dtype,
    autocast_off,
    base_features,
    global_forward_hooks,
    has_hooks,
    is_conv1d,
    is_sharded,
    overrides_linear_forward,
    plain_ops_only,
    tracing,
)

# the public names (the rest is internal, underscore or not); docs/api.md lists them all
__all__ = [
    "LORA_INITS",
    "LoRALinear",
    "LoRAPlusLinear",
]

LORA_INITS = ("kaiming", "gaussian", "pissa")


def _module_device(module: nn.Module) -> torch.device:
    tensor: Tensor
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


_ranks_above_features_allowed: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "ranks_above_features_allowed", default=False
)


@contextmanager
def ranks_above_features_allowed() -> Iterator[None]:
    """Within the block, layers take ranks above ``min(in_features, out_features)``: for loading
    adapter files and for ``targets="all-linear"`` only. Hugging Face PEFT builds and saves such
    ranks (a small head under ``target_modules="all-linear"``), and they still compute a LoRA
    update (of rank at most that minimum); a layer built directly or named as a target keeps the
    bound DESIGN.md sets."""
    token = _ranks_above_features_allowed.set(True)
    try:
        yield
    finally:
        _ranks_above_features_allowed.reset(token)


def _check_rank(rank: int, in_features: int, out_features: int) -> None:
    limit = min(in_features, out_features)
    if _ranks_above_features_allowed.get() and isinstance(rank, Integral) and not isinstance(rank, bool):
        limit = max(limit, int(rank))
    if isinstance(rank, bool) or not isinstance(rank, Integral) or not 0 < rank <= limit:
        raise ValueError(
            f"rank: expected an int in [1, min(in_features, out_features)] = [1, {limit}], "
            f"got {rank!r}"
        )


def _same_values(a: Any, b: Tensor) -> bool:
    return isinstance(a, Tensor) and a.shape == b.shape and torch.equal(a.to(b.device, b.dtype), b)


@functools.lru_cache(maxsize=None)  # asked once per layer built; signatures do not change
def _layer_arguments(cls: type) -> tuple[str, ...]:
    """The keyword arguments ``cls.from_linear`` takes: the keyword-only parameters of every
    ``from_linear`` and ``_init_adapter`` in the class hierarchy (each passes the rest of its
    ``**kwargs`` on), the most basic class's first."""
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        for attribute in ("from_linear", "_init_adapter"):
            function = vars(klass).get(attribute)
            if isinstance(function, classmethod):
                function = function.__func__
            if function is None:
                continue
            for parameter in inspect.signature(function).parameters.values():
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.name not in names:
                    names.append(parameter.name)
    return tuple(names)


#: LoraConfig's names that users bring along, and what says the same here
_HF_ARGUMENTS = {
    "r": "rank=",
    "lora_alpha": "alpha=",
    "lora_dropout": "dropout=",
    "use_dora": "method='dora' (or 'qdora')",
    "target_modules": "the targets argument",
    "exclude_modules": "exclude=",
    "init_lora_weights": "init= ('kaiming', 'gaussian' or 'pissa')",
    "lora_bias": "not supported",
    "layers_to_transform": r"a regex target, e.g. re.compile(r'.*layers\.(0|1)\..*_proj')",
    "layers_pattern": r"a regex target, e.g. re.compile(r'.*layers\.(0|1)\..*_proj')",
    "task_type": "modules_to_save=[<the head's name>]",
    "is_trainable": (
        "not needed: load_adapter leaves the adapters trainable and the model's train/eval mode as "
        "it was; for inference call model.eval().requires_grad_(False)"
    ),
}


def _argument_hint(name: str, known: list[str]) -> str | None:
    """What to write instead of the unknown argument ``name``: ours for a ``LoraConfig`` name,
    else the nearest of ``known``."""
    if name in _HF_ARGUMENTS:
        return f"Hugging Face PEFT's {name} is {_HF_ARGUMENTS[name]} here"
    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean {close[0]!r}?" if close else None


def _check_layer_arguments(cls: type, kwargs: Mapping[str, Any], call: str, fixed: tuple[str, ...] = ()) -> None:
    """Raise ``TypeError`` naming an argument of ``kwargs`` that ``call`` (of layer class ``cls``)
    does not take, the arguments it does take (``fixed`` first) and a hint, in place of Python's
    bare "unexpected keyword argument" from a private method deep in the class chain."""
    accepted = [*fixed, *_layer_arguments(cls)]
    for name, value in kwargs.items():
        if name not in accepted:
            hint = _argument_hint(name, accepted)
            raise TypeError(
                f"{name}: {call} takes no argument {name!r} (got {name}={value!r}); its arguments are "
                f"{', '.join(accepted)}" + (f"; {hint}" if hint else "")
            )


#: what a constructor takes besides the layer arguments: the nn.Linear it builds
_CONSTRUCTED_BASE = ("in_features", "out_features", "bias", "device", "dtype")


def _check_float_dtype(dtype: Any) -> None:
    """``dtype`` of a constructed base: None or a real floating dtype (``nn.Linear`` also builds
    complex layers, whose imaginary part a real input would drop)."""
    if dtype is not None and not is_layer_dtype(dtype):
        raise TypeError(f"dtype: expected None or one of {LAYER_DTYPES}, got {dtype!r}")


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < math.inf:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < math.inf:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")


def _check_features(in_features: Any, out_features: Any) -> None:
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected an int > 0, got {value!r}")


def is_bitsandbytes_module(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes layer (its quantized Linears subclass ``nn.Linear``)."""
    return type(module).__module__.startswith("bitsandbytes")


def adapter_dtype_for(compute_dtype: torch.dtype) -> torch.dtype:
    """Adapter tensors are float32, or float64 over a float64 base (half bases train fp32 adapters)."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def _refuse_double_backward() -> None:
    """Raise inside a fused backward that was asked to build a graph (``create_graph=True``).

    The fused functions save intermediate products without a graph, so their backward is not
    itself differentiable; refusing is better than silently dropping second-order terms.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            "double backward (create_graph=True) through a LoRA/DoRA layer's fused training step is "
            "not supported; for second-order gradients use torch.func (grad of grad, jacrev, "
            "hessian), under which every layer computes with plain autograd ops, or, over a float "
            "base, make its weight trainable (base_layer.weight.requires_grad_(True))"
        )


def _save_weight_or_key(ctx: Any, tensors: list[Tensor | None], weight: RowBlocks, key_fn: Callable | None) -> None:
    """Save ``tensors`` for backward, with ``W0`` itself when ``key_fn`` is None (a dense base,
    whose ``weight`` is a single block: autograd then checks its version, as for ``nn.Linear``),
    else the key of a ``W0`` that backward decodes again (:func:`_base_weight_blocks_for_backward`)."""
    ctx.weight_saved = key_fn is None
    if key_fn is None:
        # only the input gradient reads W0 (argument 0 of both functions): without one, nothing
        # about W0 is kept or checked
        tensors = [*tensors, _row_blocks.single_block(weight) if ctx.needs_input_grad[0] else None]
    else:
        ctx.weight_key_fn = key_fn
        ctx.weight_key = key_fn()
    ctx.save_for_backward(*tensors)


def _base_weight_blocks_for_backward(ctx: Any, saved: tuple[Tensor, ...]) -> RowBlocks:
    """``W0`` in backward, as row blocks (:mod:`peft_layers._row_blocks`): the saved one, or
    decoded again through ``ctx.weight_fn`` after checking that the base did not change since
    forward (a merge, ``requantize_`` or ``load_state_dict`` in between would give the input
    gradient of another weight)."""
    if ctx.weight_saved:
        return _row_blocks.whole(saved[-1])
    if ctx.weight_key_fn() != ctx.weight_key:
        raise RuntimeError(
            "the base weight of this LoRA/DoRA layer changed between forward and backward (merge(), "
            "unmerge(), requantize_, load_state_dict, .to or an in-place write), so the input "
            "gradient would use the wrong weight; run backward before changing the base weight"
        )
    return _row_blocks.weight_blocks(ctx.weight_fn)


def _graph_freed_after_backward(grad: Tensor) -> bool:
    """Whether the backward now running, with incoming gradient ``grad``, frees the graph after
    it (no ``retain_graph``), so a fused backward may overwrite a temporary it saved with a
    product of ``grad``: nothing will read the temporary again.

    False when torch cannot tell (outside a backward, a torch without the query, or a backward
    being traced, where the query cannot be compiled and the graph's buffers are the compiler's):
    the safe answer, which only costs the fresh buffers. False as well for a batched ``grad``
    (``autograd.grad(..., is_grads_batched=True)``, vectorized ``jacobian``/``hessian``): an
    in-place product of a plain tensor with a batched one cannot be written.
    """
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    is_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    if keep_graph is None or is_batched is None or tracing() or is_batched(grad):
        return False
    return not keep_graph()


def _scaled_mm(a: Tensor, b: Tensor, scaling: float, *, shape_of: Tensor) -> Tensor:
    """``scaling * (a @ b)`` in one BLAS call.

    ``addmm`` with ``beta=0`` never reads its first argument (documented: NaN and inf in it are
    not propagated); ``shape_of`` is any tensor of the result's dtype and device that broadcasts
    to its shape (a 0-dim one will do), so no zeros are allocated for it.
    """
    return torch.addmm(shape_of, a, b, beta=0, alpha=scaling)


def _adapted_mm(
    x: Tensor, x_a: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Tensor | None, scaling: float, weight: RowBlocks,
) -> tuple[Tensor, Tensor]:
    """``(x W^T + b + s t B^T, t)`` with ``t = x_a A^T``, for 2-D ``x`` and ``x_a``; ``weight``
    is ``W``'s row blocks (:mod:`peft_layers._row_blocks`: a dense ``W`` is one block).

    The small product (and bias) first; the big GEMM then accumulates into it (``beta=1``), which
    costs less than a separate read-modify-write pass over the output. ``s`` rides in the GEMM's
    ``alpha``, applied before the result is rounded to a 16-bit dtype (``s t`` alone can
    overflow); without a bias, :func:`_scaled_mm` gives ``s t B^T`` with no ``mul_(s)`` pass over
    the output.
    """
    t = x_a @ lora_A.t()
    if bias is not None:
        out = torch.addmm(bias, t, lora_B.t(), alpha=scaling)
    else:
        out = _scaled_mm(t, lora_B.t(), scaling, shape_of=t.new_empty(()))
    return _row_blocks.add_x_wt_(out, x, weight), t


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)``, skipped when it is in ``dtype`` already (a no-op ``.to`` still costs
    a dispatch: the fused functions call this per step, where one token's step is all overhead)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _gradient_dtype(compute_dtype: torch.dtype, adapter: Tensor) -> torch.dtype:
    """The dtype the fused backward computes the adapter's gradients in: the adapter's own over a
    float16 computation, whose range (65504) cannot hold gradients summed over tokens under loss
    scaling (``torch.amp.GradScaler``), else the compute dtype (bfloat16 has float32's range)."""
    if compute_dtype == torch.float16 and adapter.dtype != torch.float16:
        return adapter.dtype
    return compute_dtype


def _adapter_grads(
    grad_z: Tensor, x_a: Tensor, t: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
    need_A: bool, need_B: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(dT, dA, dB)`` of ``z = s (x_a A^T) B^T`` (``t = x_a A^T``) for the output gradient
    ``G = grad_z``: ``dT = s G B``, ``dA = dT^T x_a``, ``dB = s G^T t``, computed in ``grad_z``'s
    dtype (the other operands are cast to it)."""
    dtype = grad_z.dtype
    t, lora_B = _cast(t, dtype), _cast(lora_B, dtype)
    grad_t = _scaled_mm(grad_z, lora_B, scaling, shape_of=t)
    grad_A = grad_t.t() @ _cast(x_a, dtype) if need_A else None
    grad_B = _scaled_mm(grad_z.t(), t, scaling, shape_of=lora_B) if need_B else None
    return grad_t, grad_A, grad_B


class _LoRAFunction(torch.autograd.Function):
    """``x W^T + b + s (x_d A^T) B^T`` on 2-D inputs, with hand-written backward.

    Against autograd's version it saves temporaries: the adapter product is added into the base
    output in place, and the input gradient ``g W + s (g B) A`` is accumulated in place. A dense
    ``W`` is saved (the parameter itself: autograd checks its version, as for ``nn.Linear``); a
    quantized one is decoded again in backward through ``weight_fn``, so no dense copy stays alive
    between forward and backward, and ``weight_key_fn`` must give its forward value then (see
    :func:`_base_weight_blocks_for_backward`); a large one on the CPU is decoded a block of rows at
    a time (a :class:`~peft_layers._row_blocks.DecodedInBlocks` ``weight_fn``), never whole.
    ``W`` itself gets no gradient (it is frozen).
    ``x_drop`` is the dropped-out input, or None when it is ``x`` itself. ``A`` and ``B`` come
    in their own dtype and are cast to ``x``'s here, so that backward can return their gradients
    in their dtype (:func:`_gradient_dtype`).

    The scalings ride inside the small GEMMs (:func:`_scaled_mm`): on a CPU, every extra
    elementwise op after a large GEMM costs far more than its size suggests (see
    ``docs/benchmarks.md``). ``W`` is fetched before the small products, not after: a quantized
    base decodes it faster there (about 1% of a QLoRA step at 1024), at the same peak memory.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        x_drop: Tensor | None,
        lora_A: Tensor,
        lora_B: Tensor,
        bias: Tensor | None,
        scaling: float,
        weight_fn: Callable[[], Tensor],
        weight_key_fn: Callable[[], tuple] | None,
    ) -> Tensor:
        weight = _row_blocks.weight_blocks(weight_fn)  # a dense W fetched now; blocks as used
        x_a = x if x_drop is None else x_drop
        out, t = _adapted_mm(x, x_a, _cast(lora_A, x.dtype), _cast(lora_B, x.dtype), bias, scaling, weight)
        _save_weight_or_key(ctx, [x_a, t, lora_A, lora_B], weight, weight_key_fn)
        del weight
        ctx.scaling = scaling
        ctx.weight_fn = weight_fn
        ctx.shared_input = x_drop is None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        _refuse_double_backward()
        saved = ctx.saved_tensors
        x_a, t, lora_A, lora_B = saved[:4]
        need_x, need_x_drop, need_A, need_B, need_bias = ctx.needs_input_grad[:5]
        grad_x = grad_x_drop = grad_bias = weight = None
        if need_x:
            weight = _base_weight_blocks_for_backward(ctx, saved)
        compute_dtype = grad_out.dtype
        grad_z = _cast(grad_out, _gradient_dtype(compute_dtype, lora_A))
        grad_t, grad_A, grad_B = _adapter_grads(grad_z, x_a, t, lora_A, lora_B, ctx.scaling, need_A, need_B)
        grad_t, lora_A = _cast(grad_t, compute_dtype), _cast(lora_A, compute_dtype)
        if weight is not None:
            # the small product first, the big GEMM(s) accumulating into it (_adapted_mm)
            into = grad_t @ lora_A if ctx.shared_input else None
            grad_x = _row_blocks.grad_times_weight(grad_out, weight, into)
            del weight
        if need_x_drop:
            grad_x_drop = grad_t @ lora_A
        if need_bias:
            grad_bias = grad_out.sum(0)
        return grad_x, grad_x_drop, grad_A, grad_B, grad_bias, None, None, None


_Layer = TypeVar("_Layer", bound="LoRALinear")


class LoRALinear(AdapterMixin, nn.Module):
    r"""A drop-in ``nn.Linear`` with a trainable low-rank update (LoRA).

    .. math::
        y = x W_0^\top + b + s\,(\mathrm{dropout}(x) A^\top) B^\top, \qquad
        s = \alpha / r \ \ (\text{rsLoRA: } \alpha / \sqrt{r})

    Args:
        in_features, out_features: sizes of the base ``nn.Linear`` built for the layer.
        rank: ``r``, in ``[1, min(in_features, out_features)]``.
        alpha: ``alpha > 0``.
        dropout: probability in ``[0, 1)`` applied to the input of the update only.
        bias: whether the base layer has a bias.
        use_rslora: use ``s = alpha / sqrt(r)`` (Kalajdzievski, 2023).
        init: ``"kaiming"`` (A kaiming-uniform with ``a = sqrt(5)``, B = 0), ``"gaussian"``
            (A ~ N(0, 1/r^2), B = 0) or ``"pissa"`` (A, B from the top-r singular triplets of
            ``W0``, and ``W0`` replaced in place by the residual ``W0 - s B A``).
        device, dtype: of the base layer. Adapter tensors are float32 (float64 over a float64
            base) whatever the base dtype; the layer computes in the base's dtype and returns
            the input's dtype.

    Attributes:
        base_layer: the frozen base ``nn.Linear``; ``weight`` and ``bias`` pass through to it.
        lora_A: (rank, in_features). lora_B: (out_features, rank), zeros at init.
        scaling: ``s``. merged: whether the update lives inside ``base_layer.weight``.
    """

    adapter_parameter_names: tuple[str, ...] = ("lora_A", "lora_B")
    lora_dropout: nn.Dropout
    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        init: str = "kaiming",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **method_kwargs: Any,
    ) -> None:
        nn.Module.__init__(self)
        _check_layer_arguments(type(self), method_kwargs, f"{type(self).__name__}()", _CONSTRUCTED_BASE)
        _check_features(in_features, out_features)
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {bias!r}")
        _check_float_dtype(dtype)
        base_layer = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_adapter(
            base_layer, rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init,
            **method_kwargs,
        )

    @classmethod
    def from_linear(cls: type[_Layer], linear: nn.Module, **kwargs: Any) -> _Layer:
        """Wrap an existing ``nn.Linear`` (no copy of its weight) in this adapter layer.

        A transformers ``Conv1D`` (GPT-2's linear layers, weight stored ``(in, out)``) is wrapped
        the same way; the layer then reads its weight transposed (``fan_in_fan_out``), with the
        same ``A (r, in)`` and ``B (out, r)``. Takes the keyword arguments of the constructor
        except ``in_features``, ``out_features``, ``bias``, ``device`` and ``dtype``, which come
        from ``linear``. ``init="pissa"`` rewrites ``linear.weight`` in place.
        """
        if not (isinstance(linear, nn.Linear) or is_conv1d(linear)) or is_bitsandbytes_module(linear):
            raise TypeError(
                f"linear: expected an nn.Linear or a transformers Conv1D, got {type(linear).__name__} "
                "(quantized layers take QLoRALinear or QDoRALinear)"
            )
        return cls._wrap(linear, **kwargs)

    @classmethod
    def _wrap(cls: type[_Layer], base_layer: nn.Module, **kwargs: Any) -> _Layer:
        """A new layer of this class around ``base_layer`` (checked by the caller)."""
        _check_layer_arguments(cls, kwargs, f"{cls.__name__}.from_linear()")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_adapter(base_layer, **kwargs)
        return layer

    def _init_adapter(
        self,
        base_layer: nn.Module,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
    ) -> None:
        _check_rank(rank, *base_features(base_layer))
        _check_positive("alpha", alpha)
        if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0 <= dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        if not isinstance(use_rslora, bool):
            raise TypeError(f"use_rslora: expected a bool, got {use_rslora!r}")
        if init not in LORA_INITS:
            hint = "; Hugging Face PEFT's init_lora_weights=True is init='kaiming' here" if init is True else ""
            raise ValueError(f"init: expected one of {LORA_INITS}, got {init!r}{hint}")
        self._init_adapter_state(base_layer)
        self.__dict__["_rank"] = int(rank)  # read-only afterwards: A and B are shaped by it
        self.alpha = float(alpha)
        self.use_rslora = use_rslora
        self.init = init
        self.lora_dropout = nn.Dropout(float(dropout))
        device = _module_device(base_layer)
        if device.type == "meta" and init == "pissa":
            raise ValueError(
                "init: 'pissa' splits the singular vectors of W0, which a weight on the meta device does "
                "not have; inject after the base weights are loaded"
            )
        self._create_adapter_parameters(device, adapter_dtype_for(self.compute_dtype))
        self.reset_adapter_parameters()
        if device.type == "meta":
            self._warn_meta_adapter()

    def _warn_meta_adapter(self) -> None:
        _warn(
            f"{type(self).__name__}: the base layer is on the meta device, so the adapter holds no "
            f"values yet; after to_empty(), call reset_parameters() on the adapter layers"
            f"{self._meta_note} (torch.nn's meta-device recipe calls it on every module), or load "
            "an adapter into them",
        )

    #: what the meta-device warning adds for this class
    _meta_note = ""

    def reset_parameters(self) -> None:
        """``torch.nn``'s re-initialisation hook, as ``nn.Linear`` has it: re-initialises the adapter
        (:meth:`reset_adapter_parameters`); the base layer has its own. Meta-device recipes
        (build under ``torch.device("meta")``, ``to_empty()``, then ``reset_parameters()`` on every
        module) call it, so that ``B = 0`` again and the fresh layer equals its base. DoRA's
        magnitude is ``||W0 + s B A||`` per row: call it after the base weights are loaded."""
        self.reset_adapter_parameters()

    def _create_adapter_parameters(self, device: torch.device, dtype: torch.dtype) -> None:
        # zeros, not empty: PiSSA's first initialisation folds s B A (then 0) into the base
        self.lora_A = nn.Parameter(torch.zeros(self.rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=device, dtype=dtype))

    @property
    def rank(self) -> int:
        """The rank ``r`` of ``A (r, in)`` and ``B (out, r)``, fixed at construction (read-only: a
        new rank needs new factors, so build a new layer)."""
        return cast(int, self._scaling_setting("rank"))

    @rank.setter
    def rank(self, value: int) -> None:
        raise AttributeError(
            f"rank: fixed at construction ({self.rank}: A is (rank, in_features), B (out_features, "
            f"rank)); got {value!r}. Build a new layer for another rank"
        )

    @property
    def init(self) -> str:
        """How :meth:`reset_adapter_parameters` initialises the adapter: one of ``LORA_INITS``
        (settable to another of them; ``"pissa"`` rewrites the base weight when it runs)."""
        return cast(str, self._scaling_setting("init"))

    @init.setter
    def init(self, value: str) -> None:
        if value not in LORA_INITS:
            raise ValueError(f"init: expected one of {LORA_INITS}, got {value!r}")
        self._store_setting("init", value)

    # alpha and use_rslora set the scaling s: a merged layer's unmerge() subtracts s B A with the
    # s of the moment, so a change while merged would leave s_old B A - s_new B A in W0 for good
    @property
    def alpha(self) -> float:
        """``alpha`` of the scaling ``s = alpha / rank`` (``alpha / sqrt(rank)`` with
        ``use_rslora``). Settable (a finite number > 0) while the layer is not merged."""
        return cast(float, self._scaling_setting("alpha"))

    @alpha.setter
    def alpha(self, value: float) -> None:
        _check_positive("alpha", value)
        self._set_scaling_setting("alpha", float(value))

    @property
    def use_rslora(self) -> bool:
        """rsLoRA's scaling ``s = alpha / sqrt(rank)`` in place of ``alpha / rank``. Settable (a
        bool) while the layer is not merged."""
        return cast(bool, self._scaling_setting("use_rslora"))

    @use_rslora.setter
    def use_rslora(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"use_rslora: expected a bool, got {value!r}")
        self._set_scaling_setting("use_rslora", value)

    def _scaling_setting(self, name: str) -> Any:
        # "_alpha" (and "_rank", "_init", "_lr_ratio", DoRA's "_epsilon"); layers pickled before
        # these were properties hold "alpha" in their __dict__
        state = self.__dict__
        for key in ("_" + name, name):
            if key in state:
                return state[key]
        raise AttributeError(f"{type(self).__name__} has no {name} yet")

    def _set_scaling_setting(self, name: str, value: Any) -> None:
        state = self.__dict__
        current = state.get("_" + name, state.get(name))
        if current is not None and value != current and self.merged:
            raise ValueError(
                f"{name}: this {type(self).__name__} is merged with the scaling of its current {name}, "
                "which unmerge() takes back out of W0; unmerge() before changing it"
            )
        self._store_setting(name, value)

    def _store_setting(self, name: str, value: Any) -> None:
        # under "_<name>", dropping the plain "<name>" of a layer pickled by an older version
        self.__dict__.pop(name, None)
        self.__dict__["_" + name] = value

    @property
    def scaling(self) -> float:
        """``s = alpha / rank``, or ``alpha / sqrt(rank)`` with ``use_rslora``."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def dropout(self) -> float:
        """Dropout probability on the input of the update."""
        return self.lora_dropout.p

    def reset_adapter_parameters(self) -> None:
        """Re-initialise the adapter as ``init`` says. The base is touched only by PiSSA, which
        restarts from the layer's current weight ``W0 + s B A``: the top-``r`` singular part of it
        goes to ``s B A`` and the rest to ``W0``, so the LoRA function is kept (a DoRA layer's
        magnitude is reset to the new norms). A merged layer raises ``ValueError`` (its merge
        would stay in ``W0``)."""
        if self.merged:
            raise ValueError(
                f"{type(self).__name__}: cannot re-initialise a merged layer (the merged update would "
                "stay in W0); unmerge() first"
            )
        with torch.no_grad(), autocast_off(self.lora_A):
            if self.init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                self.lora_B.zero_()
            elif self.init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.rank)
                self.lora_B.zero_()
            else:
                self._init_pissa()

    def _init_pissa(self) -> None:
        # PiSSA (Meng et al., 2024): W = U S V^T; s B A = U_r S_r V_r^T; W0 <- W - s B A, where
        # W = W0 + s B A is the current weight (W0 itself at construction, where B = A = 0)
        self._check_base_writable("init='pissa'")
        limit = min(self.in_features, self.out_features)
        if self.rank > limit:  # only a layer built under ranks_above_features_allowed() gets here
            raise ValueError(
                f"init='pissa': the split takes rank={self.rank} singular vectors of the base weight, "
                f"which has min(in_features, out_features) = {limit}"
            )
        # the residual is computed in float32 (or wider) and rounded once, as a merge is
        weight = self._read_base_weight(self._merge_dtype(self.compute_dtype))
        self._add_lora_product_(weight, self.scaling)
        u, singular, vh = torch.linalg.svd(weight.to(self.lora_A.dtype), full_matrices=False)
        root = (singular[: self.rank] / self.scaling).sqrt()
        self.lora_A.copy_(vh[: self.rank] * root[:, None])
        self.lora_B.copy_(u[:, : self.rank] * root[None, :])
        self._add_lora_product_(weight, -self.scaling)
        self._write_base_weight(weight)

    # ---- the delta ------------------------------------------------------------------------
    def delta_weight(self) -> Tensor:
        """``s * B @ A``, shape (out_features, in_features), differentiable."""
        return (self.lora_B @ self.lora_A) * self.scaling

    #: whether the merge is the single ``W0 += s B A`` (DoRA's also scales rows)
    _merge_is_one_addmm: bool = True
    #: copies of ``(A, B)`` as merged, while merged (a class default for layers pickled before it)
    _merged_factors: tuple[Tensor, Tensor] | None = None

    def merge(self) -> None:
        """Fold the update into the base weight (see :meth:`AdapterMixin.merge`). The layer keeps
        copies of ``A`` and ``B`` as merged (``rank * (in + out)`` values) until :meth:`unmerge`,
        which takes out exactly what went in even if they moved since (an optimizer step with
        zeroed gradients still moves them through momentum and weight decay)."""
        super().merge()
        self._merged_factors = (self.lora_A.detach().clone(), self.lora_B.detach().clone())

    def unmerge(self) -> None:
        """Take the merged update back out of the base weight (see :meth:`AdapterMixin.unmerge`),
        with ``A`` and ``B`` as they were merged."""
        super().unmerge()
        self._merged_factors = None

    def _merge_dtype(self, stored: torch.dtype) -> torch.dtype:
        # a dense base whose adapters share its dtype (a model cast whole, .half()): the merge is
        # one addmm_, rounded once already; a float32 copy of W0 would double the memory for it
        weight = cast(Tensor, self.base_layer.weight)
        if self._merge_is_one_addmm and weight.dtype == stored and all(
            parameter.dtype == stored for parameter in self.adapter_parameters()
        ):
            return stored
        return super()._merge_dtype(stored)

    def _merge_weight_(self, weight: Tensor) -> None:
        self._add_lora_product_(weight, self.scaling)

    def _unmerge_weight_(self, weight: Tensor) -> None:
        self._add_lora_product_(weight, -self.scaling, self._factors_as_merged())

    def _factors_as_merged(self) -> tuple[Tensor, Tensor] | None:
        """The copies of ``(A, B)`` taken at the merge, sharded as ``A`` and ``B`` are now: a layer
        merged before ``fully_shard()`` holds whole copies, which would meet DTensors."""
        factors = self._merged_factors
        if factors is None or not is_sharded(self.lora_A) or is_sharded(factors[0]):
            return factors
        from torch.distributed.tensor import distribute_tensor

        # every rank holds the same whole copy: each keeps its own shard, no communication
        lora_A, lora_B = (
            distribute_tensor(copy, cast(Any, param).device_mesh, cast(Any, param).placements, src_data_rank=None)
            for copy, param in zip(factors, (self.lora_A, self.lora_B))
        )
        return lora_A, lora_B

    def _add_lora_product_(self, weight: Tensor, factor: float, factors: tuple[Tensor, Tensor] | None = None) -> None:
        """``weight += factor * B @ A`` in place, the product in the wider of the two precisions
        (float32 adapters over a bf16 base, or a float32 dequantized base under bf16 adapters);
        ``factors`` is ``(A, B)`` to use instead of the layer's own."""
        lora_A, lora_B = factors or (self.lora_A, self.lora_B)
        dtype = torch.promote_types(weight.dtype, lora_A.dtype)
        lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
        if weight.dtype == dtype:
            weight.addmm_(lora_B, lora_A, alpha=factor)
        else:  # W + f B A computed in dtype and rounded once (merges pass a wide W: _merge_dtype)
            weight.add_(torch.mm(lora_B, lora_A), alpha=factor)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``(*, in_features) -> (*, out_features)``, in ``x``'s dtype.

        Under ``torch.autocast`` the layer computes in the autocast dtype and returns it, as
        ``nn.Linear`` does; the adapter parameters stay float32 and get float32 gradients, and
        DoRA's norm is still accumulated in float32.
        """
        self._check_input(x)
        compute_dtype = self.compute_dtype  # a property through base_layer: read it once
        dtype = autocast_dtype(x, compute_dtype)
        out_dtype = x.dtype if dtype is None else dtype
        dtype = dtype or compute_dtype
        if self.merged or not self._adapter_enabled:
            if self.merged and self.training and torch.is_grad_enabled():
                self._warn_if_training_merged()
            out = self.base_layer(x if x.dtype == dtype else x.to(dtype))
            # the layer is its base here, whatever that returns (a router's tuple)
            return out if not isinstance(out, Tensor) or out.dtype == out_dtype else out.to(out_dtype)
        if self._runs_base_hooks():
            out = self._hooked_base_forward(x if x.dtype == dtype else x.to(dtype))
            return out if out.dtype == out_dtype else out.to(out_dtype)
        # reshape and cast only when needed: each is a node in the autograd graph otherwise
        # (x's last dimension is in_features: _check_input; the properties cost a lookup per call)
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        out = self._adapter_forward(x2d if x.dtype == dtype else x2d.to(dtype))
        if x.dim() != 2:
            out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if out.dtype == out_dtype else out.to(out_dtype)

    def _warn_if_training_merged(self) -> None:
        # a merged forward never touches A, B (or m): a training step would leave them without
        # gradient, silently where other layers still give the loss a graph
        if any(parameter.requires_grad for parameter in self.adapter_parameters()):
            _warn(
                f"{type(self).__name__}: forward in training mode with gradients on, but the adapter "
                "is merged into the base weight, so its parameters get no gradient; call unmerge() "
                "(peft_layers.unmerge_adapters(model)) before training, or eval() / torch.no_grad() "
                "to only evaluate",
            )

    def _dropout_active(self) -> bool:
        return self.training and self.lora_dropout.p > 0

    def _adapter_tensors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
        """``A``, ``B`` and the base bias in ``dtype`` (casts are differentiable)."""
        return _cast(self.lora_A, dtype), _cast(self.lora_B, dtype), self._bias_in(dtype)

    def _bias_in(self, dtype: torch.dtype) -> Tensor | None:
        """The base bias in ``dtype`` (the fused functions take ``A`` and ``B`` uncast)."""
        bias = self.bias
        return None if bias is None else _cast(bias, dtype)

    def _base_weight_trainable(self) -> bool:
        return bool(getattr(self.base_layer.weight, "requires_grad", False))

    def _adapter_forward(self, x: Tensor) -> Tensor:
        """The adapted forward of a 2-D ``x``, computed in ``x``'s dtype."""
        x_drop = self.lora_dropout(x) if self._dropout_active() else None
        if torch.is_grad_enabled() and not self._base_weight_trainable() and not plain_ops_only():
            return _LoRAFunction.apply(  # A and B in their own dtype: it casts them
                x, x_drop, self.lora_A, self.lora_B, self._bias_in(x.dtype), self.scaling,
                self._weight_fn(x.dtype), self._refetch_key_fn(),
            )
        lora_A, lora_B, bias = self._adapter_tensors(x.dtype)
        x_a = x if x_drop is None else x_drop
        # global forward (pre-)hooks expect to see base_layer called (activation capture), and
        # one of them may hold its output
        hooked = global_forward_hooks()
        if not torch.is_grad_enabled() and not hooked:
            weight_fn = self._inference_weight_fn(x)
            if weight_fn is not None:
                weight = _row_blocks.weight_blocks(weight_fn)
                return _adapted_mm(x, x_a, lora_A, lora_B, bias, self.scaling, weight)[0]
        out = self.base_layer(x)
        t = x_a @ lora_A.t()
        # out of place where a hook may hold ``out``, and under torch.func: vmap over the adapter
        # alone batches ``t B^T`` but not ``out``, which an in-place add cannot hold
        if hooked or plain_ops_only():
            return torch.addmm(out, t, lora_B.t(), alpha=self.scaling)
        return out.addmm_(t, lora_B.t(), alpha=self.scaling)

    def _inference_weight_fn(self, x: Tensor) -> Callable[[], Tensor] | None:
        """For a no-grad forward of the 2-D ``x``: a function giving ``W0`` in ``x``'s dtype when
        the base computes ``x W0^T + b`` from it (then the adapter's product can go first and the
        base GEMM accumulate into it), or None when the base multiplies otherwise (a quantized
        base on one of bitsandbytes' kernels), or while the layers compute with plain ops
        (:func:`~peft_layers.adapter.plain_ops_only`: a traced graph is then the same with and
        without gradients)."""
        return None if plain_ops_only() else self._weight_fn(x.dtype)

    def _runs_base_hooks(self) -> bool:
        """Whether the forward calls ``base_layer`` as a module, input shape and all, so that
        hooks of its own (activation capture, pruning) run as they would without the adapter, and
        an ``nn.Linear`` subclass with a ``forward`` of its own computes what it computes alone."""
        return has_hooks(self.base_layer) or overrides_linear_forward(self.base_layer)

    def _hooked_base_forward(self, x: Tensor) -> Tensor:
        """``base_layer(x) + s (dropout(x) A^T) B^T`` with plain autograd ops, out of place (the
        hooks may hold the base output), ``x`` of any leading shape in the compute dtype."""
        lora_A, lora_B, _ = self._adapter_tensors(x.dtype)
        x_drop = self.lora_dropout(x) if self._dropout_active() else x
        out = self.base_layer(x)
        expected = (*x.shape[:-1], self.out_features)
        if not isinstance(out, Tensor) or tuple(out.shape) != expected:
            # a router returning (scores, logits), a layer reshaping its output into groups
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(
                f"{type(self).__name__}: its base_layer, a {type(self.base_layer).__name__}, returned "
                f"{got} for an input of shape {tuple(x.shape)}, not the {expected} of a linear layer "
                "that a LoRA update can be added to; leave it out of the targets (exclude=...)"
            )
        return out + ((x_drop @ lora_A.t()) @ lora_B.t()) * self.scaling

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # a state dict does not record whether its layer was merged: a merged layer takes the loaded
        # weight as a merged one, right for a merged source and wrong for an unmerged one
        changed = self.merged and any(
            key in state_dict and not _same_values(state_dict[key], value)
            for key, value in self.state_dict(prefix=prefix).items()
            if not key.endswith("bias")
        )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if changed:
            self._merged_values_replaced()
            _warn(
                f"{type(self).__name__}: loaded other values into a merged layer; a state dict does not "
                "record whether its layer was merged, so the loaded weight is taken as a merged one "
                "(right only if it came from a merged layer). Load state dicts into unmerged layers "
                "from unmerged ones, and merge after loading",
            )

    def _merged_values_replaced(self) -> None:
        """Called after a merged layer loaded other values: the loaded ``A`` and ``B`` are taken
        as the merged ones (DoRA also forgets its merge gain)."""
        self._merged_factors = None

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> LoRALinear:
        super()._apply(fn, *args, **kwargs)
        factors = self._merged_factors
        if factors is not None:
            if factors[0].is_meta and not self.lora_A.is_meta:
                self._merged_factors = None  # to_empty() after a move to meta: no values to keep
            else:  # the copies follow the factors' device and dtype (.to(), .half())
                self._merged_factors = (
                    factors[0].to(self.lora_A.device, self.lora_A.dtype),
                    factors[1].to(self.lora_B.device, self.lora_B.dtype),
                )
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
            f"merged={self.merged}"
        )


class LoRAPlusLinear(LoRALinear):
    r"""A :class:`LoRALinear` that carries LoRA+'s learning-rate ratio (Hayou et al., 2024).

    LoRA+ trains ``B`` at ``lr * lr_ratio`` and ``A`` at ``lr``; the forward is plain LoRA.
    ``lr_ratio`` (> 0, default 16) is read by :meth:`param_groups` and by
    ``peft_layers.loraplus_param_groups``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        lr_ratio: float = 16.0,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> None:
        # device named in the signature: torch.nn.utils.skip_init looks for it there
        super().__init__(in_features, out_features, lr_ratio=lr_ratio, device=device, **kwargs)

    def _init_adapter(self, base_layer: nn.Module, *, lr_ratio: float = 16.0, **kwargs: Any) -> None:
        _check_positive("lr_ratio", lr_ratio)
        super()._init_adapter(base_layer, **kwargs)
        self.lr_ratio = float(lr_ratio)

    @property
    def lr_ratio(self) -> float:
        """``B``'s learning rate over ``A``'s. Settable: a finite number > 0."""
        return cast(float, self._scaling_setting("lr_ratio"))

    @lr_ratio.setter
    def lr_ratio(self, value: float) -> None:
        _check_positive("lr_ratio", value)  # a negative ratio would make B ascend its gradient
        self._store_setting("lr_ratio", float(value))

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer groups for this layer's adapter: ``A`` at ``lr``, ``B`` at ``lr * lr_ratio``."""
        _check_positive("lr", lr)
        _check_non_negative("weight_decay", weight_decay)
        return [
            {"params": [self.lora_A], "lr": lr, "weight_decay": weight_decay},
            {"params": [self.lora_B], "lr": lr * self.lr_ratio, "weight_decay": weight_decay},
        ]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lr_ratio={self.lr_ratio:g}"
