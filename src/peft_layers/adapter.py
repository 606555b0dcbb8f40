"""AdapterMixin: what every adapter layer shares.

An adapter layer is a frozen ``base_layer`` plus a small trainable delta. The mixin owns the base
layer's bookkeeping (freezing, pass-through of ``weight``/``bias``/``in_features``/``out_features``),
the merge state machine, turning the adapter off and on, and ``to_linear()``. A method (LoRA, DoRA,
...) supplies only its delta: how to fold it into a dense weight and back out again.

The base is read through four small hooks, so that a quantized base reuses all of this:

- ``_compute_weight()``: the dense (out, in) weight in compute dtype, possibly aliasing the base's
  storage (never mutated through this reference).
- ``_read_base_weight(dtype=None)``: a fresh dense copy that the caller may mutate (in ``dtype``).
- ``_write_base_weight(weight)``: store a dense weight (of any float dtype) back into the base.
- ``_base_matmul(x)``: ``x @ W0^T`` without bias.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ._devices import LAYER_DTYPES, is_layer_dtype
from ._warnings import warn as _warn

# the public names (the rest is internal, underscore or not); docs/api.md lists them all
__all__ = [
    "AdapterMixin",
]


def _device_type(tensor: Tensor) -> str:
    """``tensor.device.type``, without building a ``torch.device`` for CPU and CUDA tensors
    (forwards that read ``x.device.type`` per call measured slower in some A/B runs than the
    read itself explains: docs/benchmarks.md, Observations)."""
    if tensor.is_cpu:
        return "cpu"
    if tensor.is_cuda:
        return "cuda"
    return tensor.device.type


def autocast_enabled(where: Tensor) -> bool:
    """Whether ``torch.autocast`` is on for the device type of tensor ``where`` (never for a
    device type it does not know, such as ``meta``)."""
    try:
        return torch.is_autocast_enabled(_device_type(where))
    except RuntimeError:
        return False


def autocast_dtype(x: Tensor, compute_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype ``torch.autocast`` asks matmuls on ``x``'s device to run in, or None when it is
    off there (or the layer computes in float64, which autocast leaves alone, as it does for
    ``nn.Linear``)."""
    if compute_dtype == torch.float64 or not autocast_enabled(x):
        return None
    return torch.get_autocast_dtype(_device_type(x))


@contextmanager
def autocast_off(where: Tensor) -> Iterator[None]:
    """Turn ``torch.autocast`` off for the block on the device type of tensor ``where``, where it
    is on: for the computations that must keep their own precision (DoRA's norm,
    initialisation)."""
    if autocast_enabled(where):
        with torch.autocast(_device_type(where), enabled=False):
            yield
    else:
        yield


def tracing() -> bool:
    """Whether ``torch.compile``, ``torch.export`` or ``torch.jit.trace`` traces, or a
    ``torch.func`` transform runs: no cache may be read or filled then (a traced graph must not
    bake one in, and fake or wrapped tensors have no storage or version counter)."""
    return torch.compiler.is_compiling() or plain_ops_only()


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ...) is running: the
    fused autograd functions do not support them (they keep state on ``ctx`` in ``forward``), so
    the layers take their plain-op paths then."""
    return torch._C._are_functorch_transforms_active()


def plain_ops_only() -> bool:
    """Whether the layers must compute with plain autograd ops rather than their fused autograd
    functions: under a ``torch.func`` transform (:func:`functorch_active`), and while
    ``torch.jit.trace`` records, which cannot record a custom backward (it failed with an
    internal ``unordered_map::at`` error)."""
    return functorch_active() or torch.jit.is_tracing()


_optimizer_steps = 0

#: serialises the entries and exits of disable_adapter() blocks (layers' and modules to save's):
#: each reads, then writes, the layer's state, and blocks of several threads may overlap
DISABLE_LOCK = threading.RLock()


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def optimizer_steps() -> int:
    """How many ``torch.optim`` optimizer steps this process has run (any optimizer, any
    parameters): a cache key part that changes whenever any optimizer may have written."""
    return _optimizer_steps


# PyTorch's fused optimizers (fused=True: AdamW, SGD, ...) update parameters in place without
# bumping their version counters, so a key on a trainable tensor's version alone misses their
# steps; every torch.optim.Optimizer step runs this global hook
register_optimizer_step_post_hook(_count_optimizer_step)


class SameObject:
    """A cache-key part equal only to another made from the very same, still living object.

    Storage pointers and version counters alone do not identify a tensor: a new tensor can get the
    address of one just freed, with the same version (0), and a cache keyed by them would then
    hit values of the old one. A weak reference tells the two apart without keeping the old one
    alive."""

    __slots__ = ("_ref",)

    def __init__(self, obj: object) -> None:
        self._ref: weakref.ref | None = weakref.ref(obj)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SameObject):
            return NotImplemented
        obj = self._ref() if self._ref is not None else None
        return obj is not None and other._ref is not None and obj is other._ref()

    __hash__ = None  # type: ignore[assignment]  # equality changes when the object dies

    def __reduce__(self) -> tuple:
        # a pickled or deep-copied cache belongs to other tensors: its keys must never match
        return (_unmatched, ())


def _unmatched() -> SameObject:
    """A :class:`SameObject` equal to nothing (what a pickled or copied one becomes)."""
    key = SameObject.__new__(SameObject)
    key._ref = None
    return key


def version_key(tensor: Tensor) -> tuple[SameObject, int, int, int] | None:
    """``(the tensor object, storage pointer, autograd version counter, optimizer steps)`` of
    ``tensor``: it changes on every in-place write, when the tensor is replaced (even by one at the
    same address), and, for a tensor that requires grad, on every ``torch.optim`` optimizer step
    (fused optimizers write without bumping the version counter). None for an inference tensor (one
    created under ``torch.inference_mode()``), which has no version counter, so a cache keyed on it
    must miss; None too while ``torch.compile``, ``torch.export`` or ``torch.jit.trace`` traces
    (fake tensors have no storage, and a traced graph must not bake a cache in), and under
    ``torch.func`` transforms (their wrapped tensors have no storage either). Writes through
    ``.data`` change none of these (see ``DoRALinear.reset_norm_cache``)."""
    if tracing() or tensor.is_inference():
        return None
    steps = _optimizer_steps if tensor.requires_grad else 0
    return SameObject(tensor), tensor.data_ptr(), tensor._version, steps


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a shard of FSDP2's ``fully_shard``), by class name, so
    that ``torch.distributed`` need not be imported."""
    return type(tensor).__name__ == "DTensor"


#: what to do instead of merging or converting a sharded layer
SHARDED_ADVICE = (
    "gather first: on every rank state = {k: v.full_tensor() for k, v in model.state_dict().items()}, "
    "then on one rank load it into the model built without fully_shard() and merge there (or merge "
    "before fully_shard())"
)


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has hooks of its own: forward, forward-pre or backward hooks, or a
    ``forward`` replaced on the instance (accelerate's ``add_hook_to_module`` wraps modules so);
    global module hooks are not counted. The adapter layers compute their base product from
    ``base_layer.weight`` in their fused paths, which would skip such hooks."""
    return bool(
        module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
        or module._backward_hooks or "forward" in module.__dict__
    )


def global_forward_hooks() -> bool:
    """Whether global module forward or forward-pre hooks are registered
    (``register_module_forward_hook``, ``register_module_forward_pre_hook``, as activation-capture
    tools use): they expect to see every module called, and a base output they may hold must not
    be updated in place."""
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


#: nn.Linear subclasses whose own forward computes exactly x W^T + b (module.qualname)
_PLAIN_LINEAR_SUBCLASSES = frozenset({"transformers.models.falcon.modeling_falcon.FalconLinear"})


def class_path(module: nn.Module) -> str:
    """``module``'s class as ``"package.module.QualifiedName"``, for messages and class lists."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def overrides_linear_forward(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` subclass with a ``forward`` of its own (a scaled,
    clamped or low-precision linear): its output is then not ``x W^T + b`` computed from its
    ``weight``, which the adapter layers' fused paths compute instead of calling it. Subclasses
    known to compute exactly that (Falcon's ``FalconLinear``) do not count."""
    if not isinstance(module, nn.Linear):
        return False
    if type(module).forward is nn.Linear.forward:
        return False
    return class_path(module) not in _PLAIN_LINEAR_SUBCLASSES


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layers): ``y = x W + b`` with
    its weight stored ``(in_features, out_features)``, the transpose of ``nn.Linear``'s (Hugging
    Face PEFT's ``fan_in_fan_out``). Found by class, so transformers need not be installed."""
    return is_conv1d_class(type(module))


def is_conv1d_class(cls: object) -> TypeGuard[type]:
    """Whether ``cls`` is transformers' ``Conv1D`` class or a subclass of it."""
    return is_transformers_subclass(cls, "Conv1D")


def is_transformers_subclass(cls: object, name: str) -> TypeGuard[type]:
    """Whether ``cls`` is transformers' class ``name`` or a subclass of it, found by the names in
    its MRO, so that transformers need not be imported (nor installed)."""
    return isinstance(cls, type) and any(
        klass.__name__ == name and klass.__module__.startswith("transformers.") for klass in cls.__mro__
    )


def holds_non_finite(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds NaN or inf (one device sync); never for a meta tensor, which
    holds no values to check."""
    return not tensor.is_meta and not bool(torch.isfinite(tensor).all())


def base_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear base: an ``nn.Linear`` (or a layer with those
    attributes) or a transformers ``Conv1D``, whose weight is ``(in, out)``."""
    if is_conv1d(module):
        fan_in, fan_out = cast(Tensor, module.weight).shape
        return int(fan_in), int(fan_out)
    linear = cast(nn.Linear, module)  # or a layer with the same attributes
    return int(linear.in_features), int(linear.out_features)


def check_linear_input(x: object, in_features: int) -> None:
    """Refuse what a linear layer of ``in_features`` inputs cannot take: anything but a
    floating-point tensor of shape ``(*, in_features)`` (as ``nn.Linear`` requires: an integer
    input would otherwise be cast to the compute dtype and the output truncated)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"input: expected a floating-point tensor, got {kind}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"input: expected shape (*, in_features={in_features}), got {tuple(x.shape)}")


class AdapterMixin:
    """Base layer handling, merge state machine and enable/disable for adapter layers.

    Mixed into an ``nn.Module`` subclass that sets ``self.base_layer`` and calls
    :meth:`_init_adapter_state`. Subclasses implement :meth:`_merge_weight_` and
    :meth:`_unmerge_weight_` (in-place edits of a dense copy of ``W0``) and :meth:`delta_weight`.

    State: ``merged`` is True while the delta lives inside the base weight; then
    ``forward(x) == base_layer(x)``. A merged layer is always enabled: disabling a merged layer
    raises, and :meth:`disable_adapter` unmerges for the duration of the block (a merged layer
    over a quantized base refuses it: each block would requantize twice).
    """

    base_layer: nn.Module
    #: names of the trainable adapter tensors, in the order ``adapter_parameters()`` yields them
    adapter_parameter_names: tuple[str, ...] = ()
    #: True when the base stores its weight (in, out), as transformers' Conv1D does: the hooks
    #: below then hand out its transpose, so the methods see (out, in) as for nn.Linear (a class
    #: default too, for layers pickled before the attribute existed)
    fan_in_fan_out: bool = False

    def _init_adapter_state(self, base_layer: nn.Module) -> None:
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        self._merged = False
        self._adapter_enabled = True

    @property
    def merged(self) -> bool:
        """Whether the update is folded into the base weight (``W0 + delta`` stored there).
        Read-only: :meth:`merge` and :meth:`unmerge` change it with the weight."""
        state = self.__dict__  # layers pickled by older versions hold the plain attribute instead
        return bool(state.get("_merged", state.get("merged", False)))

    @merged.setter
    def merged(self, value: bool) -> None:
        # a flag set by hand would disagree with the weight: the update applied twice, or not at all
        raise AttributeError(
            f"merged: read-only (got {value!r}); merge() and unmerge() change the base weight and set it"
        )

    # ---- pass-through to the base layer -------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The base layer's weight (``W0``, or ``W0`` with the delta folded in while merged), as the
        base stores it: ``(in, out)`` for a transformers ``Conv1D`` (``fan_in_fan_out``)."""
        return cast(Tensor, self.base_layer.weight)

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias ``b``."""
        return cast("Tensor | None", self.base_layer.bias)

    @property
    def in_features(self) -> int:
        """The base layer's ``in_features``."""
        if self.fan_in_fan_out:
            return cast(Tensor, self.base_layer.weight).shape[0]
        return cast(int, self.base_layer.in_features)

    @property
    def out_features(self) -> int:
        """The base layer's ``out_features``."""
        if self.fan_in_fan_out:
            return cast(Tensor, self.base_layer.weight).shape[1]
        return cast(int, self.base_layer.out_features)

    # ---- hooks onto the base weight (dense nn.Linear versions) --------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the layer computes in: the base weight's dtype for a dense base."""
        return cast(Tensor, self.base_layer.weight).dtype

    def _compute_weight(self) -> Tensor:
        weight = cast(Tensor, self.base_layer.weight)
        return weight.t() if self.fan_in_fan_out else weight

    def _weight_fn(self, dtype: torch.dtype) -> Callable[[], Tensor]:
        """A function returning ``_compute_weight()`` in ``dtype`` (another dtype only under
        ``torch.autocast``), for the fused functions to fetch ``W0`` when they need it."""
        if dtype == self.compute_dtype:
            return self._compute_weight
        return lambda: self._compute_weight().to(dtype)

    def _refetch_key_fn(self) -> Callable[[], tuple] | None:
        """For the fused functions: None when they may save ``W0`` for backward (a dense base: the
        parameter itself, free to keep, and autograd's own version check then catches an in-place
        change, as for ``nn.Linear``); else a key function for a ``W0`` they decode again in
        backward, which must return its forward value (a quantized base)."""
        return None

    def _read_base_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        weight = self._compute_weight().detach()
        return weight.to(dtype or weight.dtype, memory_format=torch.contiguous_format, copy=True)

    def _merge_dtype(self, stored: torch.dtype) -> torch.dtype:
        """The dtype a merge computes in for a weight stored in ``stored``: at least float32 and
        the adapter's own dtype, so that ``W0 + delta`` (and DoRA's row scaling) meets a 16-bit
        weight once, when it is stored, as Hugging Face PEFT's merge does. Rounding ``delta`` to
        the weight's dtype first, or DoRA's ``W'`` before its scaling, would round two or three
        times. Its float32 copy of ``W0`` takes less memory than the 16-bit copy and float32
        ``B A`` that rounding route held: ``W0 += s B A`` then runs in place, in one GEMM.
        (LoRA's own override keeps a 16-bit dtype whose adapters share it: one ``addmm_``.)"""
        dtype = torch.promote_types(stored, torch.float32)
        for parameter in self.adapter_parameters():
            dtype = torch.promote_types(dtype, parameter.dtype)
        return dtype

    #: whether merge() and unmerge() work on a base sharded by FSDP2's ``fully_shard`` (DTensors):
    #: LoRA's ``W0 += s B A`` runs shard by shard; DoRA's norms and requantizing need whole tensors
    _merges_sharded: bool = True

    def _check_not_sharded(self, call: str, why: str) -> None:
        """Raise ``ValueError`` naming ``call`` and ``why`` if the layer's tensors are sharded."""
        tensors = [*self.base_layer.parameters(), *self.base_layer.buffers(), *self.adapter_parameters()]
        if any(is_sharded(tensor) for tensor in tensors):
            raise ValueError(
                f"{call}: this {type(self).__name__} is sharded (DTensors of FSDP2's fully_shard()); "
                f"{why}; {SHARDED_ADVICE}"
            )

    def _check_base_writable(self, call: str) -> None:
        """Raise ``ValueError`` if ``call`` could not write a weight into the base: its ``weight``
        is computed on every forward (a parametrization, or a hook-based ``weight_norm`` or
        pruning), so a write would be lost; or it is sharded and the method's merge needs whole
        tensors."""
        if not self._merges_sharded:
            self._check_not_sharded(call, f"the merge of {type(self).__name__} needs whole tensors")
        if "weight" not in self.base_layer._parameters:
            raise ValueError(
                f"{call}: base_layer.weight is computed (a parametrization, or a hook-based weight_norm "
                "or pruning), so the new weight cannot be written into it; to_linear() and "
                "merge_and_unload() give a merged copy instead"
            )

    def _write_base_weight(self, weight: Tensor) -> None:
        with torch.no_grad():
            cast(Tensor, self.base_layer.weight).copy_(weight.t() if self.fan_in_fan_out else weight)

    def _base_matmul(self, x: Tensor) -> Tensor:
        if self.fan_in_fan_out:
            return x @ cast(Tensor, self.base_layer.weight)
        return F.linear(x, cast(Tensor, self.base_layer.weight))

    def _base_weight_key(self) -> tuple | None:
        """A cheap key that changes whenever the base weight changes (in place or replaced), or
        None when no such key exists (see :func:`version_key`): nothing may be cached then. Keys
        DoRA's norm cache."""
        weight = cast(Tensor, self.base_layer.weight)
        version = version_key(weight)
        return None if version is None else (*version, weight.dtype, weight.device, tuple(weight.shape))

    # ---- what a method supplies ---------------------------------------------------------
    def delta_weight(self) -> Tensor:  # pragma: no cover - abstract
        """The update as a dense (out, in) tensor: the merged weight is ``W0 + delta_weight()``."""
        raise NotImplementedError

    def _merge_weight_(self, weight: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _unmerge_weight_(self, weight: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- merge state machine ------------------------------------------------------------
    def merge(self) -> None:
        """Fold the adapter into the base weight in place; ``forward`` then costs one matmul.

        The merged weight is computed in float32 (or the adapter's dtype, if wider) and rounded
        once to the base's dtype: a bf16 or float16 base holds ``W0 + delta`` rounded once.

        Raises ``ValueError`` if the layer is already merged, its adapter is disabled, its base
        weight is computed (a parametrization), or the adapter holds NaN or inf.
        """
        if self.merged:
            raise ValueError(f"merge(): {type(self).__name__} is already merged; call unmerge() first")
        if not self._adapter_enabled:
            raise ValueError(
                f"merge(): the adapter of this {type(self).__name__} is disabled; enable it first"
            )
        self._check_base_writable("merge()")
        non_finite = self._non_finite_adapter_parameters()
        if non_finite:
            raise ValueError(
                f"merge(): {non_finite} of this {type(self).__name__} hold NaN or inf; merging would "
                "write them into the base weight, which unmerge() could not take back"
            )
        self._warn_if_base_forward_is_its_own("merge()")
        with torch.no_grad():
            weight = self._merged_weight(self.compute_dtype)
            self._refuse_out_of_range(weight, self.compute_dtype, "merge()")
            self._write_base_weight(weight)
        self._merged = True

    def _merged_weight(self, stored: torch.dtype) -> Tensor:
        """A new dense ``W0 + delta`` in the merge dtype for a weight kept in ``stored``
        (:meth:`_merge_dtype`), not yet rounded to it nor written anywhere."""
        weight = self._read_base_weight(self._merge_dtype(stored))
        self._merge_weight_(weight)
        return weight

    def _refuse_out_of_range(self, merged: Tensor, stored: torch.dtype, call: str) -> None:
        """Raise ``ValueError`` naming ``call`` if the merged weight (not yet written) holds NaN,
        inf or values beyond the range of ``stored``, the dtype it is to be kept in: finite
        adapters can still overflow ``W0 + delta`` (a float16 base past 65504), which a merged
        base would keep for good. One device sync."""
        if merged.is_meta or merged.numel() == 0:
            return
        limit = torch.finfo(stored).max
        consequence = ", which unmerge() could not take back" if call == "merge()" else ""
        if is_sharded(merged):
            # one verdict for every rank (a reduction over the mesh): a rank refusing alone would
            # leave its peers merging on, into the next layer's collectives, and hang
            outside = (merged.abs() <= limit).logical_not().to(torch.float32).amax()
            if bool(cast(Any, outside).full_tensor() > 0):
                raise ValueError(
                    f"{call}: W0 + delta of this {type(self).__name__} holds values beyond {stored}'s "
                    f"finite range (+-{limit:g}) or NaN on some rank's shard; the merged weight would "
                    f"hold inf{consequence}"
                )
            return
        low, high = torch.aminmax(merged)
        if not (bool(low >= -limit) and bool(high <= limit)):  # NaN fails both comparisons
            raise ValueError(
                f"{call}: W0 + delta of this {type(self).__name__} holds values from {low.item():g} to "
                f"{high.item():g}, beyond {stored}'s finite range (+-{limit:g}) or NaN; the merged "
                f"weight would hold inf{consequence}"
            )

    def unmerge(self) -> None:
        """Take the adapter back out of the base weight (exact up to float rounding).

        Raises ``ValueError`` if the layer is not merged.
        """
        if not self.merged:
            raise ValueError(f"unmerge(): {type(self).__name__} is not merged; nothing to unmerge")
        self._check_unmergeable()
        self._check_base_writable("unmerge()")
        with torch.no_grad():
            weight = self._read_base_weight(self._merge_dtype(self.compute_dtype))
            self._unmerge_weight_(weight)
            self._write_base_weight(weight)
        self._merged = False

    def _warn_if_base_forward_is_its_own(self, call: str) -> None:
        # the merge writes W0 + delta into the weight; the subclass's forward need not apply it as
        # x W^T + b (a scaled or clamped linear), and to_linear() drops that forward altogether
        if overrides_linear_forward(self.base_layer):
            _warn(
                f"{call}: base_layer is a {class_path(self.base_layer)}, an nn.Linear with a forward of its own; the merged "
                "weight W0 + delta computes what the adapter layer computes only where that forward "
                "is x W^T + b (to_linear() and merge_and_unload() give a plain nn.Linear)"
            )

    def _non_finite_adapter_parameters(self) -> list[str]:
        """The names of the adapter tensors that hold NaN or inf (one device sync each; tensors on
        the meta device hold no values to check)."""
        return [name for name in self.adapter_parameter_names if holds_non_finite(getattr(self, name))]

    def _check_unmergeable(self) -> None:
        """Raise ``ValueError`` if this merged layer cannot give its ``W0`` back (the model tools
        ask every layer first, so that a refusal changes nothing)."""

    def _check_disable(self) -> None:
        """Raise ``ValueError`` if :meth:`disable_adapter` must refuse this layer (asked before
        anything changes; ``disable_adapters`` asks every layer first)."""
        if self.merged:
            self._check_unmergeable()

    # ---- enable / disable ---------------------------------------------------------------
    @property
    def adapter_enabled(self) -> bool:
        """False while the layer behaves exactly as its base layer."""
        return self._adapter_enabled

    @adapter_enabled.setter
    def adapter_enabled(self, enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"adapter_enabled must be a bool, got {enabled!r}")
        if self.merged and not enabled:
            raise ValueError(
                "adapter_enabled: cannot disable the adapter of a merged layer; unmerge() first "
                "or use the disable_adapter() context manager, which unmerges for you (but for a "
                "quantized base, which it would requantize twice: unmerge() that one first)"
            )
        self._adapter_enabled = enabled

    @contextmanager
    def disable_adapter(self) -> Iterator[nn.Module]:
        """Context manager: inside the block the layer computes ``base_layer(x)`` only.

        A merged layer is unmerged on entry and merged again on exit (a merged quantized layer
        refuses: see ``QLoRALinear``). Blocks may nest or overlap (several threads): the first
        entry saves the layer's state and the last exit restores it, whatever order they end in.
        The state is the layer's, so every thread's forward sees the adapter disabled while any
        block is open.
        """
        with DISABLE_LOCK:
            if self.disable_blocks == 0:
                self._check_disable()
                saved = (self.merged, self._adapter_enabled)
                if saved[0]:
                    self.unmerge()
                self._adapter_enabled = False
                self._disable_saved = saved
            self._disable_blocks = self.disable_blocks + 1
        try:
            yield cast(nn.Module, self)  # mixed into an nn.Module subclass
        finally:
            with DISABLE_LOCK:
                self._disable_blocks -= 1
                if self._disable_blocks == 0:
                    was_merged, was_enabled = self._disable_saved
                    self._adapter_enabled = was_enabled
                    if was_merged:
                        self.merge()

    def __getstate__(self) -> dict[str, Any]:
        # a copy or pickle taken inside a disable_adapter() block is outside it: only the live
        # block's exit counts it down. The copy keeps the state the block left (adapter disabled,
        # unmerged), as a plain layer the caller can enable.
        parent = getattr(super(), "__getstate__", None)  # nn.Module's, or object's (Python >= 3.11)
        state = dict(parent()) if parent is not None else self.__dict__.copy()
        state.pop("_disable_blocks", None)
        state.pop("_disable_saved", None)
        return state

    @property
    def disable_blocks(self) -> int:
        """How many :meth:`disable_adapter` blocks the layer is inside. Leaving the last one
        restores the layer (and re-merges one that was merged), so ``unload`` refuses a layer
        inside one: its original base would get the merge back."""
        return getattr(self, "_disable_blocks", 0)  # layers pickled by older versions have none

    # ---- conversion ---------------------------------------------------------------------
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` (a new module) that computes what the layer computes now: its
        weight is ``W0`` with the adapter merged, or ``W0`` alone while the adapter is disabled.

        A quantized base is dequantized, so the result is the exact float merge. Weight and bias
        are both in ``dtype``, by default ``compute_dtype`` (the dtype the layer adds the bias in),
        so the result computes what the unmerged layer computes even when the base's bias has a
        dtype of its own (a quantized base keeps its bias apart from ``compute_dtype``). The merge
        itself runs in float32 or wider (see :meth:`merge`) and is rounded to ``dtype`` once. The
        layer itself is left unchanged.
        """
        if dtype is not None and not is_layer_dtype(dtype):
            raise ValueError(f"dtype: expected None or one of {LAYER_DTYPES}, got {dtype!r}")
        self._check_not_sharded("to_linear()", "the new nn.Linear would hold shards outside fully_shard()")
        self._warn_if_base_forward_is_its_own("to_linear()")
        dtype = dtype or self.compute_dtype
        with torch.no_grad():
            if not self.merged and self._adapter_enabled:
                weight = self._merged_weight(dtype)
                self._refuse_out_of_range(weight, dtype, "to_linear()")
            else:
                weight = self._read_base_weight(self._merge_dtype(dtype))
            weight = weight.to(dtype)
            bias = self.bias
            linear = nn.Linear(
                self.in_features, self.out_features, bias=bias is not None, device="meta"
            )
            linear.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                bias = bias.detach().to(dtype=weight.dtype, copy=True)
                linear.bias = nn.Parameter(bias, requires_grad=False)
        return linear

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable adapter tensors (``lora_A``, ``lora_B``, and ``magnitude`` for DoRA)."""
        for name in self.adapter_parameter_names:
            yield getattr(self, name)

    def _check_input(self, x: Tensor) -> None:
        check_linear_input(x, self.in_features)
