"""Merging, unloading and disabling the adapters of a model."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from .._devices import LAYER_DTYPES, is_layer_dtype
from .._warnings import warn as _warn
from ..adapter import is_conv1d, is_conv1d_class, is_sharded, is_transformers_subclass, overrides_linear_forward
from ..lora import LoRALinear, is_bitsandbytes_module
from ..modules_to_save import ModuleToSave
from ..qlora import REQUANTIZE_CONSEQUENCE, UNMERGE_REQUANTIZE_CONSEQUENCE, QLoRALinear
from ..quant import QuantizedLinear
from ._methods import is_quantized_linear
from ._state import _prevailing_float_dtype
from ._tree import (
    _adapter_layers_or_raise,
    _module_names,
    _progress,
    _set_module,
    _stack_class,
    _stacked_layers,
    iter_adapter_layers,
    iter_modules_to_save,
)


# ---- merge / unload --------------------------------------------------------------------------
def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every adapter layer: ``W0 <- W0 + delta`` (see ``layer.merge()``); returns ``model``.

    Raises ``ValueError`` (changing nothing) if a layer is already merged or disabled, if a base
    weight is computed (a parametrization), if an adapter holds NaN or inf, or if a layer's
    ``W0 + delta`` leaves its dtype's range (every merged weight is computed and checked before
    the first is written).
    """
    layers = _adapter_layers_or_raise(model, "merge_adapters()")
    bad = [name for name, layer in layers if layer.merged or not layer.adapter_enabled]
    if bad:
        raise ValueError(f"merge_adapters(): these layers are already merged or disabled: {bad}")
    for name, layer in layers:  # every refusal before the first change
        layer._check_base_writable(f"merge_adapters(): {name!r}")
    _refuse_shared_base_weights(layers)
    non_finite = {name: found for name, layer in layers if (found := layer._non_finite_adapter_parameters())}
    if non_finite:
        raise ValueError(
            f"merge_adapters(): these layers' adapters hold NaN or inf: {non_finite}; merging would "
            "write them into the base weights, which unmerge_adapters() could not take back"
        )
    # W0 + delta out of its dtype's range shows only in the merged weight: computed and checked for
    # every layer before the first write, so that the refusal changes nothing (undoing merges would
    # requantize a quantized base twice, and round a 16-bit one). One more merge's work per layer.
    with torch.no_grad():
        for name, layer in layers:
            merged = layer._merged_weight(layer.compute_dtype)
            layer._refuse_out_of_range(merged, layer.compute_dtype, f"merge_adapters(): {name!r}")
            del merged
    with _one_requantize_warning([layer for _, layer in layers], "merge_adapters()"):
        for _, layer in _progress(layers, "merge_adapters()"):  # a quantized base requantizes: slow
            layer.merge()
    return model


def _refuse_shared_base_weights(layers: list[tuple[str, LoRALinear]]) -> None:
    """Raise ``ValueError`` if two adapter layers' base weights share elements (targets with tied
    weights): each merge would add its update into the other's weight too, and both layers would
    compute ``W0 + delta_1 + delta_2``. Views of one storage that share no element (slices of a
    fused weight) pass."""
    by_storage: dict[tuple[torch.device, int], list[tuple[str, Tensor]]] = {}
    for name, layer in layers:
        weight = cast(Tensor, layer.base_layer.weight)
        if isinstance(layer.base_layer, QuantizedLinear) or is_sharded(weight):
            continue  # codes of its own; a shard has no storage here (and LoRA merges it shard by shard)
        address = weight.untyped_storage().data_ptr()
        if address:  # 0: no storage (meta tensors)
            by_storage.setdefault((weight.device, address), []).append((name, weight))
    shared = [names for held in by_storage.values() if len(held) > 1 and (names := _sharing_elements(held))]
    if shared:
        raise ValueError(
            f"merge_adapters(): the adapter layers {shared} share one base weight (tied weights), so "
            "each merge would add its update into the others' weight too; merge_and_unload() gives "
            "each layer a merged weight of its own"
        )


def _sharing_elements(views: list[tuple[str, Tensor]]) -> list[str]:
    """The names of the ``views`` (of one storage) that read an element another one reads.

    Views whose first-to-last element ranges are apart share nothing (row slices of a fused
    weight). Otherwise each view writes its index into a CPU map of the elements they span, and
    a view that finds an earlier index there shares with it (column slices interleave without
    sharing); only strides and offsets matter, no value is read."""
    spans = [_element_span(view) for _, view in views]
    if not any(_overlap(a, b) for i, a in enumerate(spans) for b in spans[i + 1:]):
        return []
    start = min(span.start for span in spans)
    owner = torch.zeros(max(span.stop for span in spans) - start, dtype=torch.int32, device="cpu")
    sharing: set[str] = set()
    for index, (name, view) in enumerate(views, start=1):
        if 0 in view.stride():  # an expanded view reads its elements more than once: not a plain weight
            return [name for name, _ in views]
        cells = owner.as_strided(view.shape, view.stride(), view.storage_offset() - start)
        for earlier in cells[cells > 0].unique().tolist():
            sharing |= {name, views[earlier - 1][0]}
        cells.fill_(index)
    return [name for name, _ in views if name in sharing]


def _element_span(tensor: Tensor) -> range:
    """The storage elements ``tensor`` spans, from its first to its last."""
    start = tensor.storage_offset()
    if tensor.numel() == 0:
        return range(start, start)
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return range(start, start + last + 1)


def _overlap(first: range, second: range) -> bool:
    return max(first.start, second.start) < min(first.stop, second.stop)


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of its base weight; returns ``model``.

    Raises ``ValueError`` (changing nothing) if no layer is merged.
    """
    layers = _adapter_layers_or_raise(model, "unmerge_adapters()")
    merged = [layer for _, layer in layers if layer.merged]
    if not merged:
        raise ValueError("unmerge_adapters(): no adapter layer is merged")
    for name, layer in layers:  # every refusal before the first change
        if layer.merged:
            layer._check_unmergeable()
            layer._check_base_writable(f"unmerge_adapters(): {name!r}")
    with _one_requantize_warning(merged, "unmerge_adapters()", UNMERGE_REQUANTIZE_CONSEQUENCE):
        for layer in _progress(merged, "unmerge_adapters()"):
            layer.unmerge()
    return model


def _refuse_sharded_layers(layers: Iterable[tuple[str, Any]], call: str) -> None:
    """Raise ``ValueError`` if an adapter layer among ``layers`` is sharded: ``call`` would put
    layers into the model that hold shards outside ``fully_shard()``, and the next forward fails."""
    for name, layer in layers:
        if isinstance(layer, LoRALinear):
            layer._check_not_sharded(f"{call}: {name!r}", "the layers it puts in would hold shards outside fully_shard()")


def _refuse_fsdp_units(layers: Iterable[tuple[str, Any]]) -> None:
    """Raise ``ValueError`` for ``unload`` if ``fully_shard()`` was applied to an adapter layer
    itself: that unit manages its base's parameters, and the base put back would hold shards no
    unit gathers. (Sharded from an outer module, the base stays managed and unloads fine.)"""
    for name, layer in layers:
        if any(cls.__name__ == "FSDPModule" for cls in type(layer).__mro__):
            raise ValueError(
                f"unload(): {name!r} is a unit of FSDP2's fully_shard() of its own, which manages its "
                "base's parameters: the base put back would hold shards that no unit gathers; unload "
                "before fully_shard(), or shard the blocks around the adapter layers"
            )


@contextlib.contextmanager
def _one_requantize_warning(
    layers: list[Any], caller: str, consequence: str = REQUANTIZE_CONSEQUENCE
) -> Iterator[None]:
    """One warning for all the quantized layers that ``caller`` merges or unmerges in the block,
    in place of one per layer; ``consequence`` says what the requantization costs."""
    schemes = sorted({layer.base_layer.scheme for layer in layers if isinstance(layer, QLoRALinear)})
    if not schemes:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".* is quantized \(", category=UserWarning)
        yield
    count = sum(isinstance(layer, QLoRALinear) for layer in layers)
    _warn(
        f"{caller}: {count} adapter layer(s) have a quantized base ({', '.join(schemes)}), " + consequence,
    )


#: (caller, class) -> what to use instead of a call on a model that is itself that layer
_ROOT_HINTS: dict[tuple[str, str], str] = {
    ("merge_and_unload()", "LoRALinear"): "model.to_linear() gives its merged nn.Linear",
    ("merge_and_unload()", "ModuleToSave"): "model.trained is its trained copy",
    ("unload()", "LoRALinear"): "model.base_layer is the layer it wraps (call model.unmerge() first if it is merged)",
    ("unload()", "MultiLoRALinear"): "model.base_layer is the layer it stacks on",
    ("unload()", "ModuleToSave"): "model.original is the module it wraps",
}


def _refuse_root(model: nn.Module, caller: str) -> None:
    """Raise ``ValueError`` if ``model`` itself is an adapter layer, a stack of served adapters or
    a module to save: ``caller`` replaces such modules in their parent, and the root has none."""
    kinds = (LoRALinear, _stack_class(), ModuleToSave)
    kind = next((cls.__name__ for cls in kinds if isinstance(model, cls)), None)
    if kind is None:
        return
    raise ValueError(
        f"{caller}: model is itself a {type(model).__name__}, which cannot be replaced in place; "
        f"{caller[:-2]} takes a model that holds adapter layers; {_ROOT_HINTS[(caller, kind)]}"
    )


@dataclass
class _WithNewParameters:
    """A module to put back once it holds ``parameters`` (by attribute name) and is in mode
    ``training``: set only after every layer is built, so that a build that fails leaves the
    model as it was."""

    module: nn.Module
    parameters: dict[str, nn.Parameter]
    training: bool

    def finish(self) -> nn.Module:
        for name, parameter in self.parameters.items():
            setattr(self.module, name, parameter)
        return self.module.train(self.training)


def _replace_layers(
    model: nn.Module,
    layers: list[tuple[str, Any]],
    build: Callable[[Any], nn.Module | _WithNewParameters],
    caller: str,
) -> None:
    """Put ``build(layer)`` in place of each layer, under every name the layer has; every layer is
    built before the first is put in place."""
    names = _module_names(model)
    new_modules = [(names[id(layer)], build(layer)) for _, layer in _progress(layers, caller)]
    for layer_names, new in new_modules:
        module = new.finish() if isinstance(new, _WithNewParameters) else new
        for name in layer_names:
            _set_module(model, name, module)


def merge_and_unload(model: nn.Module, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every adapter layer with a plain ``nn.Linear`` holding ``W0 + delta`` (a
    transformers ``Conv1D``, in its ``(in, out)`` layout, for a ``Conv1D`` base), and every
    module to save (:class:`~peft_layers.ModuleToSave`) with its trained copy.

    A float base is that layer: the base module itself comes back, with its hooks, holding the
    merged weight as a new tensor (a weight tied to other modules stays theirs). A quantized
    base gives a new float ``nn.Linear`` (a ``Conv1D`` where transformers quantized one, as in a
    4-bit GPT-2); a computed weight or a forward of the base's own gives a new ``nn.Linear``. No base
    changes before every layer is merged, so an error changes nothing.

    The merge is exact in float: a quantized base is dequantized (never requantized). ``dtype``
    is the dtype of the new weights. By default: for a dense base, its weight's dtype; for a
    quantized base, the dtype that holds most of the model's other float parameters (float32
    after :func:`prepare_for_kbit_training`), so that the plain ``nn.Linear``, which casts no
    input, fits between its neighbours as the adapter layer did; the compute dtype when the
    model has no other float parameters. The new layers take the training mode of the layers
    they replace, and their weight and bias require grad as the bases' did (frozen, but for a
    bias that ``bias="all"`` trained or a weight the caller unfroze), and a module to save
    becomes its trained copy as it is, as in Hugging Face PEFT.
    A ``dtype`` other than that of the layers around them gives layers that the next forward
    feeds inputs of another dtype (``nn.Linear`` casts none): cast the whole model with it
    (``model.to(dtype)``), as the merge casts only what it builds.
    A ``model`` that is itself an adapter layer or module to save raises ``ValueError`` (it has
    no parent to be replaced in): ``layer.to_linear()`` merges a single layer.
    A model transformers loaded in 4 or 8 bits whose quantized layers are all merged becomes a
    float model: its ``quantization_config`` and quantizer are cleared, as transformers'
    ``dequantize()`` clears them, so ``save_pretrained`` writes a float checkpoint. Where some
    stay quantized, it warns that such a mixed checkpoint does not load back.
    """
    if dtype is not None and not is_layer_dtype(dtype):
        raise ValueError(f"dtype: expected None or one of {LAYER_DTYPES}, got {dtype!r}")
    layers = _adapter_layers_or_raise(model, "merge_and_unload()")
    # a disabled adapter would be dropped from the merged weight: ambiguous, so refused
    disabled = [name for name, layer in layers if not layer.adapter_enabled]
    if disabled:
        raise ValueError(
            f"merge_and_unload(): these layers have their adapter disabled: {disabled}; enable them "
            "(adapter_enabled = True) to merge them, or unload() to drop the adapters"
        )

    _refuse_sharded_layers(layers, "merge_and_unload()")
    _refuse_root(model, "merge_and_unload()")
    neighbours = _prevailing_float_dtype(model, {id(p) for _, layer in layers for p in layer.parameters()})

    def build(layer: LoRALinear) -> nn.Module | _WithNewParameters:
        quantized = isinstance(layer.base_layer, QuantizedLinear)
        linear = layer.to_linear(dtype or (quantized and neighbours) or layer.compute_dtype)
        if _keeps_its_base(layer):
            return _base_with_merged_weight(layer, linear)
        # the model's own layout: a Conv1D base, or one transformers quantized from a Conv1D
        source = type(layer.base_layer) if layer.fan_in_fan_out else getattr(layer.base_layer, "source_cls", None)
        merged = _as_conv1d(linear, source) if is_conv1d_class(source) else linear
        _take_requires_grad(merged, layer.base_layer)
        # a new module starts in training mode: keep the mode of the layer it replaces
        return merged.train(layer.training)

    _replace_layers(model, layers, build, "merge_and_unload()")
    _replace_layers(model, list(iter_modules_to_save(model)), _trained_copy, "merge_and_unload()")
    dequantized = sum(isinstance(layer.base_layer, QuantizedLinear) for _, layer in layers)
    config = getattr(model, "config", None)
    if dequantized and getattr(config, "quantization_config", None) is not None:
        if _records_bitsandbytes(model) and not any(is_quantized_linear(m) for m in model.modules()):
            _forget_quantization(model)  # nothing quantized is left: a float model, saved as one
            return model
        _warn(
            f"merge_and_unload(): {dequantized} merged layer(s) are float now, inside a model that "
            "transformers loaded quantized (its config keeps quantization_config, its other layers "
            "stay quantized), and save_pretrained() of that mix does not load back. For a merged "
            "float checkpoint, load the base model in float, load_adapter(..., method='lora' or "
            "'dora'), then merge_and_unload()",
        )
    return model


def _records_bitsandbytes(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model whose quantization record is bitsandbytes' (the
    one ``_forget_quantization`` may clear: another method's, GPTQ's say, describes layers this
    library never touches, and another kind of config may not let it go)."""
    if not is_transformers_subclass(type(model), "PreTrainedModel"):
        return False
    record = getattr(getattr(model, "config", None), "quantization_config", None)
    method = record.get("quant_method") if isinstance(record, dict) else getattr(record, "quant_method", None)
    return getattr(method, "value", method) == "bitsandbytes"


def _forget_quantization(model: nn.Module) -> None:
    """Clear what transformers records of a 4- or 8-bit load (the config's
    ``quantization_config``, ``hf_quantizer``, ``is_loaded_in_4bit``/``8bit``) on a model that
    holds no quantized layer any more, as transformers' own ``dequantize()`` does: its
    ``save_pretrained`` then writes a float checkpoint that ``from_pretrained`` loads. With the
    record kept, it wrote a "quantized" one whose float weights failed to load."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    config = getattr(model, "config", None)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)


def _keeps_its_base(layer: LoRALinear) -> bool:
    """Whether ``merge_and_unload`` puts ``layer``'s base module itself back, with the merged
    weight, rather than a new one: a float ``nn.Linear`` or ``Conv1D`` whose weight is a plain
    parameter and whose forward is ``x W^T + b``. It keeps its hooks, its class and its other
    attributes, as Hugging Face PEFT's merge in place does. A quantized base becomes a float
    layer (a new module); a computed weight (a parametrization) and a forward of the base's own
    get a plain ``nn.Linear`` (see ``to_linear``)."""
    base = layer.base_layer
    return (
        isinstance(base, nn.Linear) or is_conv1d(base)
    ) and not is_bitsandbytes_module(base) and "weight" in base._parameters and not overrides_linear_forward(base)


def _base_with_merged_weight(layer: LoRALinear, linear: nn.Linear) -> _WithNewParameters:
    """``layer``'s base, to hold ``linear``'s merged weight (transposed for a ``Conv1D``) and bias
    as new parameters: a weight tied to other modules stays theirs, unmerged, as with a new
    layer. The base's ``requires_grad`` flags carry over (a bias that ``bias="all"`` trained)."""
    base = layer.base_layer
    weight = linear.weight.detach()
    weight = weight.t().contiguous() if layer.fan_in_fan_out else weight
    parameters = {"weight": nn.Parameter(weight, requires_grad=layer.weight.requires_grad)}
    bias = layer.bias  # the base's own
    if bias is not None and bias.dtype != weight.dtype:  # merge_and_unload(dtype=...) casts both
        parameters["bias"] = nn.Parameter(linear.bias.detach(), requires_grad=bias.requires_grad)
    return _WithNewParameters(base, parameters, layer.training)


def _trained_copy(saved: ModuleToSave) -> nn.Module:
    """A module to save after ``merge_and_unload``: its trained copy, as it is (trainable, as in
    Hugging Face PEFT)."""
    return saved.trained


def _take_requires_grad(merged: nn.Module, base: nn.Module) -> None:
    """Give the weight and bias of ``merged`` (a merged layer, or the bitsandbytes module that
    ``unload`` puts back) the ``requires_grad`` of the base's (a bias that ``bias="all"`` trained
    stays trainable; a quantized base's codes are never trainable)."""
    for name in ("weight", "bias"):
        tensor, before = getattr(merged, name, None), getattr(base, name, None)
        if isinstance(tensor, nn.Parameter) and isinstance(before, Tensor):
            tensor.requires_grad_(before.requires_grad and before.is_floating_point())


def _as_conv1d(linear: nn.Linear, conv_class: type) -> nn.Module:
    """A ``conv_class`` (transformers' Conv1D) holding ``linear``'s weight transposed to
    ``(in, out)`` and its bias: the model's own layer type, so its checkpoints keep their layout."""
    with torch.device("meta"):
        conv = conv_class(linear.out_features, linear.in_features)
    conv.weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
    if linear.bias is not None:
        conv.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    else:
        conv.bias = None
    return conv


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside the block every adapter layer of ``model`` computes its base layer
    alone (``layer.disable_adapter()`` on each), and every module to save its original, so the
    model is its base model, e.g. the reference policy of DPO. Merged layers are unmerged on entry
    and merged back on exit; everything is restored on exit, also after an error.

    Raises ``ValueError`` (changing nothing) for a model without adapter layers, with a merged
    layer that cannot unmerge, or with a merged quantized layer (each block would requantize it
    twice, and the rounding compounds: unmerge it first). Stacked adapters (serving) use ``set_adapter(model, None)``.
    """
    layers = _adapter_layers_or_raise(model, "disable_adapters()")
    refused = []
    for name, layer in layers:  # every refusal before the first change
        try:
            layer._check_disable()
        except ValueError as error:
            refused.append((name, error))
    if refused:
        first_name, first_error = refused[0]
        raise ValueError(
            f"disable_adapters(): {len(refused)} layer(s) refuse it, {[n for n, _ in refused][:10]}; "
            f"the first, {first_name!r}: {first_error} (pl.unmerge_adapters(model) unmerges every layer)"
        ) from None
    with contextlib.ExitStack() as stack:
        blocks: list[tuple[str, LoRALinear | ModuleToSave]] = [*layers, *iter_modules_to_save(model)]
        for _, block in blocks:
            stack.enter_context(block.disable_adapter())
        yield model


def unload(model: nn.Module) -> nn.Module:
    """Put the original layers back and drop the adapters (merged layers are unmerged first).

    For a layer built from an ``nn.Linear`` the original module object comes back. A quantized
    layer built from a bitsandbytes ``Linear4bit``/``Linear8bitLt`` gives back that module while
    it still holds the layer's weight (see ``QuantizedLinear.bnb_module``: not after a merge, which
    requantizes); otherwise its ``QuantizedLinear`` base. Layers stacked for serving
    (``MultiLoRALinear``, from ``stack_adapters``) give back their base layer too, with all their
    adapters dropped, and modules to save their original module (its trained copy is dropped).
    A ``model`` that is itself one of these raises ``ValueError`` (it has no parent to be
    replaced in): its ``base_layer`` (``original``) is the module it wraps.
    """
    layers: list[tuple[str, Any]] = [*iter_adapter_layers(model), *_stacked_layers(model)]
    saved = list(iter_modules_to_save(model))
    if not layers and not saved:
        raise ValueError("unload(): model has no adapter layers; call inject_adapters() first")
    inside = [name for name, layer in layers if isinstance(layer, LoRALinear) and layer.disable_blocks]
    if inside:
        raise ValueError(
            f"unload(): these layers are inside a disable_adapter() / disable_adapters() block: {inside}; "
            "the block's exit restores them (a merged one merges again, into the base unload gives "
            "back), so unload after the block"
        )
    _refuse_fsdp_units(layers)
    _refuse_root(model, "unload()")
    for _, layer in layers:  # every refusal before the first change
        if isinstance(layer, LoRALinear) and layer.merged:
            layer._check_unmergeable()
            layer._check_base_writable("unload()")

    def build(layer: Any) -> nn.Module:
        if isinstance(layer, LoRALinear) and layer.merged:
            layer.unmerge()
        base = layer.base_layer
        original = base.bnb_module if isinstance(base, QuantizedLinear) else None
        if original is None:
            return base
        # injection froze (or bias="all" trained) the QuantizedLinear's own bias Parameter, which
        # shares its storage with the module's: the module comes back with the flags set there
        _take_requires_grad(original, base)
        return original

    merged = [layer for _, layer in layers if isinstance(layer, LoRALinear) and layer.merged]
    with _one_requantize_warning(merged, "unload()", UNMERGE_REQUANTIZE_CONSEQUENCE):
        _replace_layers(model, layers, build, "unload()")
    _replace_layers(model, saved, lambda module: module.original, "unload()")
    return model
