"""QLoRA and QDoRA: LoRA and DoRA over a quantized, frozen base.

A quantized layer is the full-precision layer with a :class:`~peft_layers.quant.QuantizedLinear`
as its base: the math, the fused autograd functions and the merge state machine are
:class:`LoRALinear`'s and :class:`DoRALinear`'s. This module only redirects the base-weight
hooks of :class:`~peft_layers.adapter.AdapterMixin` to the quantized storage:

- the dense ``W0`` is ``base_layer.dequantize()``, decoded when needed and never kept, so no
  full-precision copy of the base stays in memory (the fused functions decode it again in
  backward rather than saving it);
- ``x W0^T`` is ``base_layer.matmul(x)``, whatever path is fastest for the scheme and device;
- writing ``W0`` (merge, unmerge, PiSSA) requantizes;
- the DoRA norm cache is keyed by ``base_layer.version``, which every requantization bumps.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from . import _row_blocks
from ._warnings import warn as _warn
from .adapter import SameObject, class_path, overrides_linear_forward, tracing
from .dora import DoRALinear
from .lora import (
    _CONSTRUCTED_BASE,
    LoRALinear,
    _check_features,
    _check_float_dtype,
    _check_layer_arguments,
    is_bitsandbytes_module,
)
from .quant import QUANT_SCHEMES, QuantizedLinear
from .quant.linear import _check_blocksize, _check_compute_dtype

# the public names (the rest is internal, underscore or not); docs/api.md lists them all
__all__ = [
    "QDoRALinear",
    "QLoRALinear",
    "quantized_base",
]

REQUANTIZE_CONSEQUENCE = (
    "so the merged weight is requantized and rounding can lose much of the update (measured on "
    "NF4: a delta of 7% of the weight's norm keeps about 0.6 cosine with the intended one). For an "
    "exact merge use to_linear() or peft_layers.merge_and_unload(), which dequantize instead."
)
#: what taking a merge back out of a quantized base costs (unmerge, unload)
UNMERGE_REQUANTIZE_CONSEQUENCE = (
    "so the weight without the adapter is requantized: it comes back within the rounding of two "
    "requantizations of W0, not as the codes it had before the merge. Keep the unmerged layer (merge "
    "a copy, or use to_linear() / peft_layers.merge_and_unload()) where W0 must stay exact."
)
REQUANTIZE_WARNING = "{call}: the base of this {cls} is quantized ({scheme}), {consequence}"


def quantized_base(
    linear: nn.Module,
    *,
    quant: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> QuantizedLinear:
    """The quantized base for ``linear``: a ``QuantizedLinear`` as is, a bitsandbytes
    ``Linear4bit``/``Linear8bitLt`` wrapped without requantizing, an ``nn.Linear`` quantized with
    ``quant``, ``blocksize`` and ``double_quant``. ``compute_dtype`` defaults to float32 for a new
    quantization and to the module's own for a wrapped one (its bias's dtype where it names none:
    ``QuantizedLinear.from_bnb``); a ``QuantizedLinear`` given with a
    ``compute_dtype`` takes it. The arguments are checked even where the layer's own scheme wins
    (a quantized layer), so that a typo never passes unseen."""
    if quant not in QUANT_SCHEMES:
        raise ValueError(f"quant: expected one of {QUANT_SCHEMES}, got {quant!r}")
    if quant != "int8":  # int8 has no blocks, as in QuantizedLinear.from_linear
        _check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant: expected a bool, got {double_quant!r}")
    if compute_dtype is not None:
        _check_compute_dtype(compute_dtype)
    if isinstance(linear, QuantizedLinear):
        if compute_dtype is not None:
            linear.compute_dtype = compute_dtype
        return linear
    if is_bitsandbytes_module(linear):  # from_bnb rejects kinds other than Linear4bit/Linear8bitLt
        return QuantizedLinear.from_bnb(linear, compute_dtype=compute_dtype)
    if isinstance(linear, nn.Linear):
        if overrides_linear_forward(linear):
            _warn(
                f"quant: {class_path(linear)} is an nn.Linear with a "
                "forward of its own, which the quantized base does not keep: it computes x W^T + b "
                "from the quantized weight. Give this layer method 'lora', which calls its forward"
            )
        return QuantizedLinear.from_linear(
            linear, scheme=quant, blocksize=blocksize, double_quant=double_quant,
            compute_dtype=compute_dtype or torch.float32,
        )
    raise TypeError(
        f"linear: expected an nn.Linear, a bitsandbytes Linear4bit/Linear8bitLt or a "
        f"QuantizedLinear, got {type(linear).__module__}.{type(linear).__name__}"
    )


def _quantized_base_and_split(
    linear: nn.Module, kwargs: dict[str, Any], *, own_linear: bool = False, **quant_kwargs: Any
) -> tuple[QuantizedLinear, LoRALinear | None, dict[str, Any]]:
    """The quantized base for ``linear`` (:func:`quantized_base` with ``quant_kwargs``), the float
    PiSSA split it was quantized from (:func:`_pissa_split_in_float`, or None) and the layer
    arguments to build the adapter with (a split's factors are taken over, not recomputed).
    ``own_linear``: ``linear`` is the caller's own (not the user's), so the split may write it."""
    split = _pissa_split_in_float(linear, kwargs, copy_linear=not own_linear)
    if split is None:
        return quantized_base(linear, **quant_kwargs), None, kwargs
    return quantized_base(split.base_layer, **quant_kwargs), split, {**kwargs, "init": "kaiming"}


def _pissa_split_in_float(linear: nn.Module, kwargs: dict[str, Any], *, copy_linear: bool = True) -> LoRALinear | None:
    """QPiSSA: for ``init="pissa"`` over a float ``nn.Linear``, the PiSSA split done before
    quantizing, on a copy (the caller's layer is left as it is): a float :class:`LoRALinear` whose
    base holds the residual ``W0 - s B A``, which is then quantized once. Splitting the quantized
    weight instead would quantize twice (the residual of a decoded weight is requantized) and
    start further from ``W0`` than plain QLoRA does. None when there is nothing to split first
    (another init, or an already quantized layer)."""
    if kwargs.get("init") != "pissa" or not isinstance(linear, nn.Linear) or is_bitsandbytes_module(linear):
        return None
    shape_kwargs = {name: kwargs[name] for name in ("rank", "alpha", "use_rslora") if name in kwargs}
    return LoRALinear.from_linear(copy.deepcopy(linear) if copy_linear else linear, init="pissa", **shape_kwargs)


_QuantizedLayer = TypeVar("_QuantizedLayer", bound="QLoRALinear")


class QLoRALinear(LoRALinear):
    r"""LoRA over a quantized base (Dettmers et al., 2023).

    .. math::
        y = x\,\mathrm{dq}(Q)^\top + b + s\,(\mathrm{dropout}(x) A^\top) B^\top

    where ``dq(Q)`` is the dequantized base weight (NF4, FP4 or int8). ``A`` and ``B`` are float32
    (float64 under a float64 ``compute_dtype``); the layer computes in ``compute_dtype``.

    Args:
        in_features, out_features, bias, device, dtype: of the ``nn.Linear`` that is built and
            quantized (its random weight makes this constructor mostly useful for tests; wrap a
            pretrained layer with :meth:`from_linear`).
        quant: ``"nf4"``, ``"fp4"`` or ``"int8"``. blocksize, double_quant: of the 4-bit schemes.
        compute_dtype: dtype of the dequantized weight and of the computation.
        **kwargs: :class:`LoRALinear`'s ``rank``, ``alpha``, ``dropout``, ``use_rslora``, ``init``.
    """

    base_layer: QuantizedLinear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        quant: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        nn.Module.__init__(self)
        _check_layer_arguments(type(self), kwargs, f"{type(self).__name__}()", _CONSTRUCTED_BASE)
        _check_features(in_features, out_features)
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {bias!r}")
        _check_float_dtype(dtype)
        linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        base, split, kwargs = _quantized_base_and_split(
            linear, kwargs, own_linear=True, quant=quant, blocksize=blocksize, double_quant=double_quant,
            compute_dtype=compute_dtype,
        )
        self._init_adapter(base, **kwargs)
        if split is not None:
            self._take_pissa_factors(split)

    @classmethod
    def from_linear(
        cls: type[_QuantizedLayer],
        linear: nn.Module,
        *,
        quant: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> _QuantizedLayer:
        """Wrap ``linear`` over a quantized base (see :func:`quantized_base`).

        An ``nn.Linear`` is quantized with ``quant``/``blocksize``/``double_quant`` (the caller's
        float weight is not kept by the layer); a bitsandbytes ``Linear4bit``/``Linear8bitLt``, as
        transformers' 4-bit/8-bit loading produces it, or a ``QuantizedLinear`` is wrapped as it
        is (its own scheme wins). Other keyword arguments are :class:`LoRALinear`'s.

        With ``init="pissa"``, an ``nn.Linear`` is split before it is quantized (QPiSSA): the
        layer starts at ``Q(W0 - s B A) + s B A``, within the quantization error of the residual
        (for pretrained weights, whose spectrum decays, smaller than ``W0``'s own). An already
        quantized layer is decoded, split and requantized, which warns as ``merge()`` does.
        """
        previous_dtype = linear.compute_dtype if isinstance(linear, QuantizedLinear) else None
        base, split, kwargs = _quantized_base_and_split(
            linear, kwargs, quant=quant, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype
        )
        try:
            layer = cls._wrap(base, **kwargs)
        except Exception:
            if previous_dtype is not None:  # a failed build leaves the caller's layer as it was
                cast(QuantizedLinear, linear).compute_dtype = previous_dtype
            raise
        if split is not None:
            layer._take_pissa_factors(split)
        return layer

    def _take_pissa_factors(self, split: LoRALinear) -> None:
        """Become the PiSSA layer whose float split is ``split`` (its base, the residual, is
        this layer's quantized base)."""
        self.init = "pissa"
        with torch.no_grad():
            self.lora_A.copy_(split.lora_A)
            self.lora_B.copy_(split.lora_B)

    # ---- the base-weight hooks of AdapterMixin, over quantized storage ------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the base is dequantized to and the layer computes in."""
        return self.base_layer.compute_dtype

    def _compute_weight(self) -> Tensor:
        return self.base_layer.dequantize()

    def _weight_fn(self, dtype: torch.dtype) -> Callable[[], Tensor]:
        base = self.base_layer
        whole = functools.partial(base.dequantize, dtype)  # decodes straight into dtype
        if base._decodes_in_blocks(dtype):  # a large weight on the CPU: see peft_layers._row_blocks
            return _row_blocks.DecodedInBlocks(whole, functools.partial(base._decode_blocks, dtype))
        return whole

    def _read_base_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.base_layer.dequantize(dtype)

    def _inference_weight_fn(self, x: Tensor) -> Callable[[], Tensor] | None:
        if self.base_layer._bnb_kernel_for(x) is not None:
            return None
        return super()._inference_weight_fn(x)

    def _write_base_weight(self, weight: Tensor) -> None:
        self.base_layer.requantize_(weight)

    def _check_base_writable(self, call: str) -> None:
        # requantize_ writes the codes, whatever holds them; it needs them whole
        self._check_not_sharded(call, f"the merge of {type(self).__name__} requantizes whole tensors")

    def _base_matmul(self, x: Tensor) -> Tensor:
        return self.base_layer.matmul(x)

    def _layer_version_key(self) -> tuple:
        """The base's own changes: ``requantize_``, ``load_state_dict``, ``.to``."""
        base = self.base_layer
        return (SameObject(base), base.version, base.compute_dtype, base.weight.device)

    def _base_weight_key(self) -> tuple | None:
        # The version counters of the stored codes and statistics also see in-place writes from
        # outside, such as DistributedDataParallel's broadcast of rank 0's buffers at wrapping.
        # Their counts only, not the tensors' identity or address: FSDP2 gathers the codes into
        # fresh tensors every forward, and a replacement goes through the layer (its version).
        if tracing():
            return None  # as for a dense base (adapter.version_key)
        key = self._layer_version_key()
        base = self.base_layer
        stored = tuple(
            -1 if tensor.is_inference() else tensor._version  # inference tensors have no counter
            for tensor in (getattr(base, name) for name in base._quantized_names())
        )
        return (*key, stored)

    def _refetch_key_fn(self) -> Callable[[], tuple]:
        # decoded again in backward (no dense copy is kept), checked against the base's own
        # version only: FSDP2 gathers the codes into fresh storage for backward
        return self._layer_version_key

    def _base_weight_trainable(self) -> bool:
        return False

    # ---- merging requantizes ------------------------------------------------------------------
    def _init_pissa(self) -> None:
        super()._init_pissa()  # decodes, splits, requantizes the residual
        _warn(
            f"init='pissa': the base of this {type(self).__name__} is quantized "
            f"({self.base_layer.scheme}), so the PiSSA residual of its decoded weight is requantized "
            "and the layer moves up to that rounding away from what it computed (from_linear() of a "
            "float nn.Linear splits before quantizing, QPiSSA, and stays closer to W0)",
        )

    def _warn_requantize(self, call: str, consequence: str) -> None:
        _warn(
            REQUANTIZE_WARNING.format(
                call=call, cls=type(self).__name__, scheme=self.base_layer.scheme, consequence=consequence
            ),
        )

    def merge(self) -> None:
        """Fold the adapter into the quantized base: dequantize, add, requantize (lossy, warns)."""
        super().merge()  # raises first on a bad state: no warning for a merge that did not happen
        self._warn_requantize("merge()", REQUANTIZE_CONSEQUENCE)

    def unmerge(self) -> None:
        """Take the adapter back out: dequantize, subtract, requantize (lossy, warns)."""
        super().unmerge()  # raises first on a bad state: no warning for a merge that did not happen
        self._warn_requantize("unmerge()", UNMERGE_REQUANTIZE_CONSEQUENCE)

    def _check_disable(self) -> None:
        # a block over a merged quantized layer would unmerge and merge again: two requantizations
        # per block, whose rounding compounds block after block (NF4: 12% of the output after one
        # block, 75% after ten, for an update of 28% of the weight's norm)
        super()._check_disable()
        if self.merged:
            raise ValueError(
                f"disable_adapter(): this {type(self).__name__} is merged into its quantized "
                f"({self.base_layer.scheme}) base: the block would unmerge and merge it again, two "
                "requantizations whose rounding compounds block after block; unmerge() it first "
                "(one requantization, after which the block changes nothing), or merge for "
                "inference only (to_linear() or peft_layers.merge_and_unload(), exact in float)"
            )


class QDoRALinear(DoRALinear, QLoRALinear):
    r"""DoRA over a quantized base: :class:`DoRALinear`'s math with :class:`QLoRALinear`'s base.

    .. math::
        W' = \mathrm{dq}(Q) + s B A,\quad n = \mathrm{sg}(\max(\|W'\|_{\text{row}}, \epsilon)),\quad
        y = \frac{m}{n} \odot (x W'^\top) + b

    ``m`` starts at the row norms of the dequantized ``W0``. The norm comes from the factored
    formula: ``||dq(Q)||^2`` per row is cached per base version, and ``A dq(Q)^T`` is computed
    with the same decoded weight as the forward in training; in no-grad inference in eval mode,
    once per change of the adapter or the base (the gain ``m / n`` is cached); in train mode or
    where nothing can be cached (tracing), by letting ``A``'s ``r`` rows ride along with ``x`` in
    one base call when it computes in float32 (a 16-bit product would round the norm). No float
    copy of the base is kept and no ``W'`` is formed.

    Takes :class:`QLoRALinear`'s arguments plus ``epsilon``.
    """

    def _take_pissa_factors(self, split: LoRALinear) -> None:
        super()._take_pissa_factors(split)
        with torch.no_grad():
            self.magnitude.copy_(self.weight_norm())  # m = ||Q(W0 - s B A) + s B A|| per row

    @property
    def _norm_rides_with_input(self) -> bool:  # type: ignore[override]
        # A's rows ride along with x through the base matmul, saving a decode of the weight,
        # unless that matmul rounds its input to int8 (int8_activations): the norm must be exact
        return not getattr(self.base_layer, "int8_activations", False)
