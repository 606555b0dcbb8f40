"""Loading an adapter file into a model: checks against the model, injection, then the fill."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..adapter import base_features, is_conv1d
from ..dora import DoRALinear
from ..lora import LoRALinear, LoRAPlusLinear, ranks_above_features_allowed
from ..modules_to_save import ModuleToSave
from ..model import (
    FLOAT_METHOD,
    METHODS,
    QUANTIZED_METHOD,
    inject_adapters,
    is_quantized_linear,
    iter_adapter_layers,
    iter_modules_to_save,
    method_of,
    unwrapped,
)
from ..model._inject import _module_to_save_refusal
from ..model._methods import QUANTIZED_BASE_METHODS, _LoadedQuantized, _layer_method
from ..model._tree import _refuse_sharded, _stacked_layers, _undo_on_error, refuse_foreign_wrapping
from ._format import _DORA_EPSILON, AdapterFile, ModuleAdapter, read_adapter
from ._save import _anchored, _most_common, _warn_shared



# ---- loading -----------------------------------------------------------------------------------
@dataclass
class _FillPlan:
    """What a load will copy: checked completely before anything is copied."""

    layers: list[tuple[LoRALinear, ModuleAdapter]]
    biases: list[tuple[Tensor, Tensor]]
    saved: list[tuple[ModuleToSave, dict[str, Tensor]]] = field(default_factory=list)


def _check_base_weight(where: str, module: ModuleAdapter, base: nn.Module, method: str) -> None:
    """The file's full base weight (if any) can be copied into ``base``, the linear layer the
    adapter wraps (``method`` is the adapter layer's): a float weight of the same shape."""
    if module.base_weight is None:
        return
    if method in QUANTIZED_BASE_METHODS or is_quantized_linear(base):
        raise ValueError(
            f"{where}: the file holds the full base weight (base_layer.weight, which Hugging Face PEFT "
            f"saves for a targeted embedding layer such as lm_head), but the base is quantized "
            f"(method {method!r}, {type(base).__name__}); a float weight cannot be loaded into it. Load it "
            "into a model with a float base (method='lora' or 'dora')"
        )
    weight = getattr(base, "weight", None)
    if not isinstance(weight, Tensor) or tuple(weight.shape) != tuple(module.base_weight.shape):
        found = tuple(weight.shape) if isinstance(weight, Tensor) else None
        raise ValueError(
            f"{where}: base_layer.weight has shape {tuple(module.base_weight.shape)} in the file but "
            f"{found} in the model"
        )


def _refuse_meta(where: str, tensors: Iterator[Tensor] | list[Tensor]) -> None:
    """Raise ``ValueError`` if any of ``tensors`` is on the meta device: copying into it keeps
    nothing."""
    if any(tensor.is_meta for tensor in tensors):
        raise ValueError(
            f"{where}: the model's tensors there are on the meta device, which holds no values, so "
            "the file's tensors would be dropped; materialise the model first (to_empty(), then "
            "load its weights), then load the adapter"
        )


def _check_fits(layer: LoRALinear, module: ModuleAdapter, adapter: AdapterFile, path: str) -> None:
    where = f"{adapter.directory}: {path!r}"
    _refuse_sharded(layer.adapter_parameters(), f"load_adapter(): {path!r}")
    _refuse_meta(where, [layer.lora_A])
    if layer.merged:
        raise ValueError(f"{where}: the layer is merged; unmerge() it before loading adapter weights into it")
    is_dora_layer = isinstance(layer, DoRALinear)
    if adapter.is_dora and not is_dora_layer:
        raise ValueError(
            f"{where}: the file is a DoRA adapter (it has lora_magnitude_vector), but the model's layer is "
            f"a {type(layer).__name__} without a magnitude; loading it as plain LoRA would drop the "
            "magnitudes and change the outputs. Inject with method='dora' (or 'qdora')"
        )
    if not adapter.is_dora and is_dora_layer:
        raise ValueError(
            f"{where}: the model's layer is a {type(layer).__name__}, but the file is a plain LoRA adapter "
            "with no lora_magnitude_vector to load into it. Inject with method='lora' (or 'qlora')"
        )
    if module.rank != layer.rank:
        raise ValueError(f"{where}: the file has rank {module.rank}, the model's layer has rank {layer.rank}")
    for name, tensor in (("lora_A", module.lora_A), ("lora_B", module.lora_B), ("magnitude", module.magnitude)):
        if tensor is not None and tuple(tensor.shape) != tuple(getattr(layer, name).shape):
            raise ValueError(
                f"{where}: {name} has shape {tuple(tensor.shape)} in the file but "
                f"{tuple(getattr(layer, name).shape)} in the model (in_features={layer.in_features}, "
                f"out_features={layer.out_features}, rank={layer.rank})"
            )
    if (adapter.init == "pissa") != (layer.init == "pissa"):
        raise ValueError(
            f"{where}: the file's adapter is {'' if adapter.init == 'pissa' else 'not '}relative to a PiSSA "
            f"residual base (init_lora_weights), the model's layer has init={layer.init!r}; the outputs "
            "would be wrong. Load into a model without adapters so the file's init is reproduced"
        )
    if module.bias is not None and (layer.bias is None or tuple(layer.bias.shape) != tuple(module.bias.shape)):
        found = None if layer.bias is None else tuple(layer.bias.shape)
        raise ValueError(
            f"{where}: the file has a bias of shape {tuple(module.bias.shape)}, the model's layer {found}"
        )
    _check_base_weight(where, module, layer.base_layer, method_of(layer))


def _plan_other_biases(model: nn.Module, adapter: AdapterFile) -> list[tuple[Tensor, Tensor]]:
    modules = dict(model.named_modules(remove_duplicate=False))
    plan = []
    for path, tensor in adapter.other_biases.items():
        module = modules.get(path)
        bias = getattr(module, "bias", None) if module is not None else None
        if not isinstance(bias, Tensor) or tuple(bias.shape) != tuple(tensor.shape):
            shape = tuple(bias.shape) if isinstance(bias, Tensor) else None
            found = "no module" if module is None else f"bias {shape}"
            raise ValueError(
                f"{adapter.directory}: the file has a bias {tuple(tensor.shape)} for {path!r}; "
                f"the model has {found} there"
            )
        plan.append((bias, tensor))
    return plan


def _check_alias_biases(model: nn.Module, adapter: AdapterFile) -> None:
    """Each bias of :attr:`AdapterFile.alias_biases` names the same module of ``model`` as one of
    the file's adapter modules or modules to save (another name of a shared module, before or
    after injection) and equals that module's bias in the file, which is the one loaded."""
    modules = dict(model.named_modules(remove_duplicate=False))
    file_biases = {
        **{p: m.bias for p, m in adapter.modules.items()},
        **{p: state.get("bias") for p, state in adapter.saved_modules.items()},
    }
    for path, tensor in adapter.alias_biases.items():
        target = modules.get(path)
        owner = next((p for p in file_biases if target is not None and modules.get(p) is target), None)
        if owner is None:
            raise ValueError(
                f"{adapter.directory}: the file has a bias for {path!r} without the module's own tensors, and "
                "the model holds none of the file's modules under that name (Hugging Face PEFT writes such "
                "a bias for another name of a shared module)"
            )
        if file_biases[owner] is None or not torch.equal(cast(Tensor, file_biases[owner]), tensor):
            raise ValueError(
                f"{adapter.directory}: {owner!r} and {path!r} name one shared module but hold different biases"
            )


def _check_saved_state(where: str, module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """The file's state of a module to save fits ``module``: the same keys, shapes and kinds."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{where}: the file's state of this module to save does not fit the model's "
            f"{type(module).__name__}; missing: {missing}, unexpected: {unexpected}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape) or tensor.is_floating_point() != own[key].is_floating_point():
            raise ValueError(
                f"{where}: {key} is {tuple(tensor.shape)} {tensor.dtype} in the file but "
                f"{tuple(own[key].shape)} {own[key].dtype} in the model"
            )


def _check_module_to_save(
    where: str, model: nn.Module, path: str, module: nn.Module | None, targets: list[nn.Module]
) -> None:
    """``module`` (at ``path``) can become a module to save beside the file's ``targets``: it
    exists and :func:`~peft_layers.model._inject._module_to_save_refusal` has nothing against it (a
    ``ValueError`` either way: the file does not fit the model)."""
    if module is None or not path:
        raise ValueError(f"{where}: the file has a module to save there, but the model has no module of that name")
    refusal = _module_to_save_refusal(model, path, module, map(id, targets))
    if refusal is not None:
        raise ValueError(f"{where}: {refusal[1]}")


def _plan_saved_modules(model: nn.Module, adapter: AdapterFile) -> list[tuple[ModuleToSave, dict[str, Tensor]]]:
    """Match the file's modules to save to the model's :class:`ModuleToSave` modules, all of them."""
    modules = dict(model.named_modules(remove_duplicate=False))
    plan: dict[int, tuple[ModuleToSave, dict[str, Tensor]]] = {}
    for path, state in adapter.saved_modules.items():
        target = modules.get(path)
        where = f"{adapter.directory}: module to save {path!r}"
        if isinstance(target, ModuleToSave):
            _refuse_meta(where, list(target.trained.state_dict().values()))
        if not isinstance(target, ModuleToSave):
            found = "no module" if target is None else f"a {type(target).__name__}"
            raise ValueError(
                f"{where}: the model has {found} there, not a ModuleToSave; load into the model without "
                "adapters (unload() first), which wraps the file's modules to save"
            )
        _check_saved_state(where, target.trained, state)
        if id(target) in plan:  # a shared module, saved under two of its names
            first = plan[id(target)][1]
            if not all(torch.equal(first[key], state[key]) for key in state):
                raise ValueError(f"{where}: it is a second name of a shared module to save, with other values")
            continue
        plan[id(target)] = (target, state)
    # a module without state (a Dropout) has nothing in the file, as in Hugging Face PEFT's
    missing = [
        name for name, module in iter_modules_to_save(model) if id(module) not in plan and module.trained.state_dict()
    ]
    if missing:
        raise ValueError(
            f"{adapter.directory}: missing keys: the model's modules to save {missing} have no state in the file "
            f"(it has {list(adapter.saved_modules)})"
        )
    return list(plan.values())


def _plan_fill(model: nn.Module, adapter: AdapterFile) -> _FillPlan:
    """Match the file's modules to the model's adapter layers and check every tensor fits."""
    modules = dict(model.named_modules(remove_duplicate=False))
    layers = list(iter_adapter_layers(model))
    layer_names = [name for name, _ in layers]
    planned: dict[int, tuple[LoRALinear, ModuleAdapter]] = {}
    for path, module in adapter.modules.items():
        target = modules.get(path)
        if target is None:
            raise ValueError(
                f"{adapter.directory}: unexpected key: the file has an adapter for {path!r}, but the model has "
                f"no module of that name; its adapter layers are {layer_names}"
            )
        if not isinstance(target, LoRALinear):
            raise ValueError(
                f"{adapter.directory}: the file has an adapter for {path!r}, a {type(target).__name__} that is "
                f"not an adapter layer; the model's adapter layers are {layer_names}. To inject the file's "
                "adapters, load into the model without adapters (unload() first)"
            )
        if id(target) in planned:  # a shared layer, saved under two of its names
            first = planned[id(target)][1]
            pairs = (
                (first.lora_A, module.lora_A), (first.lora_B, module.lora_B), (first.magnitude, module.magnitude),
                (first.bias, module.bias), (first.base_weight, module.base_weight),
            )
            if not all(
                (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                for x, y in pairs
            ):
                raise ValueError(
                    f"{adapter.directory}: {first.path!r} and {path!r} name one shared layer "
                    "but hold different tensors"
                )
            continue
        _check_fits(target, module, adapter, path)
        planned[id(target)] = (target, module)
    missing = [name for name, layer in layers if id(layer) not in planned]
    if missing:
        raise ValueError(
            f"{adapter.directory}: missing keys: the model's adapter layers {missing} have no tensors in the file "
            f"(it has {list(adapter.modules)})"
        )
    _check_alias_biases(model, adapter)
    plan = _FillPlan(list(planned.values()), _plan_other_biases(model, adapter), _plan_saved_modules(model, adapter))
    _check_ranges(plan, adapter)
    return plan


def _check_ranges(plan: _FillPlan, adapter: AdapterFile) -> None:
    """Refuse values that the model's tensors cannot hold: a float32 value that rounds past 65504
    would load into a float16 tensor (a bias, a magnitude of a model cast with .half(), a base
    weight, a module to save) as inf; the file's own values are finite."""
    pairs: list[tuple[str, Tensor | None, Tensor | None]] = []
    for layer, module in plan.layers:
        pairs += [
            (f"{module.path}.lora_A", layer.lora_A, module.lora_A),
            (f"{module.path}.lora_B", layer.lora_B, module.lora_B),
            (f"{module.path}.magnitude", getattr(layer, "magnitude", None), module.magnitude),
            (f"{module.path}.base_layer.bias", layer.bias, module.bias),
            (f"{module.path}.base_layer.weight", getattr(layer.base_layer, "weight", None), module.base_weight),
        ]
    pairs += [("a bias of the model", bias, tensor) for bias, tensor in plan.biases]
    for saved, state in plan.saved:
        own = saved.trained.state_dict()
        pairs += [(f"a module to save's {key}", own[key], tensor) for key, tensor in state.items()]
    for name, held, value in pairs:
        if held is None or value is None or not held.is_floating_point() or not value.numel():
            continue
        if torch.finfo(value.dtype).max <= torch.finfo(held.dtype).max:
            continue  # nothing finite overflows
        extremes = torch.stack(torch.aminmax(value))  # no temporary of the value's size
        if value.dtype == torch.float64 and held.dtype.itemsize < 4:
            extremes = extremes.float()  # torch casts float64 to 16 and 8 bits through float32
        largest = float(extremes.abs().max())
        if largest >= _rounding_limit(held.dtype):
            raise ValueError(
                f"{adapter.directory}: {name} holds values up to {largest:.6g}, beyond what the model's "
                f"{held.dtype} holds (largest {torch.finfo(held.dtype).max:.6g}): they would not load as "
                "themselves (inf, NaN or clamped)"
            )


def _rounding_limit(dtype: torch.dtype) -> float:
    """The magnitude from which a value rounds past ``dtype``'s largest: half a step above it,
    the step read off the bit patterns (``finfo.eps`` is wrong for some float8 types)."""
    largest = torch.tensor(torch.finfo(dtype).max, dtype=dtype, device="cpu")
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    below = (largest.view(bits) - 1).view(dtype)
    return float(largest) + (float(largest) - float(below)) / 2


def _apply(plan: _FillPlan, adapter: AdapterFile) -> None:
    with torch.no_grad():
        for layer, module in plan.layers:
            layer.lora_A.copy_(module.lora_A)
            layer.lora_B.copy_(module.lora_B)
            if module.magnitude is not None:
                cast(DoRALinear, layer).magnitude.copy_(module.magnitude)
            if module.bias is not None:
                cast(Tensor, layer.bias).copy_(module.bias)
            if module.base_weight is not None:
                # a weight tied to another module (lm_head and embed_tokens) changes there too, as in
                # Hugging Face PEFT, whose load_state_dict copies into the same tensor
                cast(Tensor, layer.base_layer.weight).copy_(module.base_weight)
            layer.alpha = module.alpha
            layer.use_rslora = adapter.use_rslora
            if isinstance(layer, DoRALinear):  # a file without the field (all of Hugging Face's) means the default
                layer.epsilon = adapter.layer_kwargs.get("epsilon", _DORA_EPSILON)
            if isinstance(layer, LoRAPlusLinear) and "lr_ratio" in adapter.layer_kwargs:
                layer.lr_ratio = adapter.layer_kwargs["lr_ratio"]
        for bias, tensor in plan.biases:
            bias.copy_(tensor)
    for saved, state in plan.saved:
        saved.trained.load_state_dict(state)


def _fill(model: nn.Module, adapter: AdapterFile) -> None:
    """Check the file against the model's adapter layers, warn, then copy the tensors: a warning
    that the caller turned into an error (``-W error``) stops the load before anything is copied."""
    plan = _plan_fill(model, adapter)
    _warn_shared(model, "load_adapter()", f"the file {str(adapter.directory)!r}")
    _apply(plan, adapter)


#: inject_adapters arguments that the file decides: load_adapter refuses them
_FROM_FILE = (
    "targets", "exclude", "modules_to_save", "rank", "alpha", "rank_pattern", "alpha_pattern", "use_rslora", "init",
)
_QUANT_KWARGS = ("quant", "blocksize", "double_quant", "compute_dtype")


def _inject_kwargs(
    adapter: AdapterFile, method: str, overrides: dict[str, Any], paths: list[str]
) -> dict[str, Any]:
    """``inject_adapters`` keyword arguments that rebuild the file's layers at ``paths`` (ranks,
    alphas, ...) with ``method``.

    Each rank or alpha that differs from the file's most common one is keyed by the file's path of
    its module, anchored; ``inject_adapters`` tries every name of a shared module, so the path in
    the file need not be the module's first name."""
    ranks = [m.rank for m in adapter.modules.values()]
    alphas = [m.alpha for m in adapter.modules.values()]
    r, alpha = _most_common(ranks), _most_common(alphas)
    group = [adapter.modules[p] for p in paths]
    kwargs: dict[str, Any] = {
        "rank": r,
        "alpha": alpha,
        "rank_pattern": {_anchored(m.path): m.rank for m in group if m.rank != r},
        "alpha_pattern": {_anchored(m.path): m.alpha for m in group if m.alpha != alpha},
        "use_rslora": adapter.use_rslora,
        "init": adapter.init,
        "dropout": adapter.dropout,
        "bias": adapter.bias_mode,
    }
    for key, value in adapter.layer_kwargs.items():
        if (
            (key == "epsilon" and method in ("dora", "qdora"))
            or (key == "lr_ratio" and method == "lora_plus")
            or (key in _QUANT_KWARGS and method in QUANTIZED_BASE_METHODS)
        ):
            kwargs[key] = value
    kwargs.update(overrides)
    return kwargs


def _methods_by_path(adapter: AdapterFile, method: str, named: bool, modules: Mapping[str, nn.Module]) -> dict[str, str]:
    """The method that wraps each module of the file: the caller's ``method`` when ``named``;
    else the file's, but a file that says nothing of quantization (Hugging Face PEFT's: the base
    model's loading decides it) gets QLoRA/QDoRA on the layers that are quantized (bitsandbytes or
    ``QuantizedLinear``), and a QLoRA/QDoRA file keeps its ``float_modules`` float."""
    if named or method not in ("lora", "dora", "qlora", "qdora"):
        return dict.fromkeys(adapter.modules, method)
    if method in ("lora", "dora"):
        return {
            p: QUANTIZED_METHOD[method] if is_quantized_linear(modules.get(p) if p else None) else method
            for p in adapter.modules
        }
    floats = set(adapter.float_modules)
    return {p: FLOAT_METHOD[method] if p in floats else method for p in adapter.modules}


def _refuse_from_file(inject_kwargs: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` naming the ``inject_kwargs`` that the file decides (:data:`_FROM_FILE`)."""
    given = [name for name in _FROM_FILE if name in inject_kwargs]
    if given:
        passed = ", ".join(f"{name}={inject_kwargs[name]!r}" for name in given)
        raise TypeError(
            f"load_adapter(): {given} come from the adapter file and cannot be passed (got {passed}); "
            f"the file decides {list(_FROM_FILE)}, and inject_kwargs may set the method and the layer "
            "arguments it leaves open (method, dropout, bias, quant, compute_dtype, ...)"
        )


def _inject_and_fill(model: nn.Module, adapter: AdapterFile, inject_kwargs: dict[str, Any]) -> None:
    overrides = dict(inject_kwargs)
    method = overrides.pop("method", adapter.method)
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if adapter.is_dora and method not in ("dora", "qdora"):
        raise ValueError(
            f"method: {method!r} cannot hold the DoRA adapter in {adapter.directory} (it has "
            "lora_magnitude_vector); use 'dora' or 'qdora'"
        )
    if not adapter.is_dora and method in ("dora", "qdora"):
        raise ValueError(
            f"method: {method!r} needs DoRA magnitudes, but the adapter in {adapter.directory} is plain "
            "LoRA; use 'lora', 'lora_plus' or 'qlora'"
        )

    # check the planned layers against the model's modules before touching anything
    modules = dict(model.named_modules(remove_duplicate=False))
    # the file's own QLoRA/QDoRA, passed again, is no override: its float_modules stay float
    named = "method" in inject_kwargs and not (adapter.float_modules and inject_kwargs["method"] == adapter.method)
    methods = _methods_by_path(adapter, method, named, modules)
    # as inject_adapters decides: in a model loaded quantized, a float target of a quantized method
    # gets the float method
    scope = _LoadedQuantized(model)
    methods = {p: _layer_method(modules[p], m, scope(p)) if p in modules else m for p, m in methods.items()}
    for path, module in adapter.modules.items():
        method = methods[path]  # this module's
        target = modules.get(path) if path else None
        if target is None:
            raise ValueError(
                f"{adapter.directory}: the file has an adapter for {path!r}, but the model has no module "
                "of that name"
            )
        _refuse_meta(f"{adapter.directory}: {path!r}", [*target.parameters(), *target.buffers()])
        _refuse_sharded(target.parameters(), f"load_adapter(): {path!r}")
        if is_quantized_linear(target) and method not in QUANTIZED_BASE_METHODS:
            raise ValueError(
                f"{adapter.directory}: {path!r} is a quantized {type(target).__name__}, which method "
                f"{method!r} cannot wrap; load with method='qlora' (or 'qdora' for DoRA)"
            )
        if is_conv1d(target) and method in QUANTIZED_BASE_METHODS:
            raise ValueError(
                f"{adapter.directory}: {path!r} is a transformers Conv1D, which method {method!r} cannot "
                f"quantize; load with method={FLOAT_METHOD[method]!r} (the adapter is the same on a float base)"
            )
        in_features: int | None
        out_features: int | None
        if is_conv1d(target):
            in_features, out_features = base_features(target)
        else:
            in_features, out_features = getattr(target, "in_features", None), getattr(target, "out_features", None)
        if not isinstance(in_features, int) or not isinstance(out_features, int):
            raise ValueError(
                f"{adapter.directory}: the file has an adapter for {path!r}, but the model's module there is a "
                f"{type(target).__name__}, not a linear layer"
            )
        want = ((module.rank, in_features), (out_features, module.rank))
        if (tuple(module.lora_A.shape), tuple(module.lora_B.shape)) != want:
            raise ValueError(
                f"{adapter.directory}: {path!r}: lora_A {tuple(module.lora_A.shape)} and lora_B "
                f"{tuple(module.lora_B.shape)} do not fit the model's layer (in_features={in_features}, "
                f"out_features={out_features}): expected {want[0]} and {want[1]}"
            )
        if module.rank > min(in_features, out_features) and adapter.init == "pissa":
            raise ValueError(
                f"{adapter.directory}: {path!r}: rank {module.rank} exceeds min(in, out) = "
                f"{min(in_features, out_features)}, and a PiSSA adapter's residual takes as many "
                "singular vectors as its rank"
            )
        bias = getattr(target, "bias", None)
        if module.bias is not None and (not isinstance(bias, Tensor) or bias.shape != module.bias.shape):
            raise ValueError(
                f"{adapter.directory}: {path!r}: the file has a bias, the model's layer has none that fits"
            )
        _check_base_weight(f"{adapter.directory}: {path!r}", module, target, method)
    _plan_other_biases(model, adapter)
    _check_alias_biases(model, adapter)
    for path, state in adapter.saved_modules.items():
        where = f"{adapter.directory}: module to save {path!r}"
        _check_module_to_save(where, model, path, modules.get(path), [modules[p] for p in adapter.modules])
        _check_saved_state(where, modules[path], state)
        _refuse_meta(where, list(modules[path].state_dict().values()))
    groups: dict[str, list[str]] = {}  # method -> its paths, in file order
    for path, method in methods.items():
        groups.setdefault(method, []).append(path)
    mixed = len(groups) > 1
    saved_paths = set(adapter.saved_modules)
    touched = [modules[p] for p in [*adapter.modules, *saved_paths]]
    # injecting freezes the targets (PiSSA rewrites their weights); a failure undoes it all
    with _undo_on_error(model, touched, values=adapter.init == "pissa"):
        for method, group in groups.items():
            # the float layers of a quantized model (T5's wo) take no quantization arguments
            layer_overrides = {
                k: v for k, v in overrides.items()
                if not (mixed and k in _QUANT_KWARGS and method not in QUANTIZED_BASE_METHODS)
            }
            kwargs = _inject_kwargs(adapter, method, layer_overrides, group)
            if saved_paths and method == next(iter(groups)):
                kwargs["modules_to_save"] = lambda name, module: name in saved_paths
            paths = set(group)
            # the file overwrites the fresh A, B: don't let their initialisation move the caller's RNG
            with _random_states_kept(model), ranks_above_features_allowed():
                inject_adapters(model, lambda name, module: name in paths, method=method, **kwargs)
        _fill(model, adapter)


@contextlib.contextmanager
def _random_states_kept(model: nn.Module) -> Iterator[None]:
    """Restore, on exit, the CPU's random state and that of every accelerator ``model``'s
    tensors are on (CUDA, MPS, XPU...): new adapter tensors are initialised there, from those
    devices' generators. A device type torch has no generator module for is skipped."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))  # the CPU's
        for device_type, indices in _accelerator_devices(tensors).items():
            if hasattr(getattr(torch, device_type, None), "get_rng_state"):
                stack.enter_context(torch.random.fork_rng(devices=indices, device_type=device_type))
        yield


def _accelerator_devices(tensors: Iterable[Tensor]) -> dict[str, list[int]]:
    """The devices of ``tensors`` other than the CPU and meta: their indices by device type."""
    found: dict[str, set[int]] = {}
    for tensor in tensors:
        device = tensor.device
        if device.type not in ("cpu", "meta"):
            found.setdefault(device.type, set()).add(device.index or 0)
    return {device_type: sorted(indices) for device_type, indices in found.items()}


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    adapter_name: str | None = None,
    **inject_kwargs: Any,
) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` or Hugging Face PEFT into ``model``.

    The files are read from ``directory`` (``adapter_name=None`` or ``"default"``) or
    ``directory/<adapter_name>/``; see :func:`read_adapter` for the checks on the files alone.

    - If ``model`` has adapter layers, the file fills them: every adapter layer must have its
      tensors in the file and every module in the file must be an adapter layer of the model,
      with the same rank and shapes; a DoRA file needs DoRA layers and a LoRA file plain LoRA
      layers. The layers take the file's ``alpha``, ``use_rslora`` and DoRA ``epsilon`` (1e-8
      when the file records none; they define the function);
      dropout and the base are left as they are (but for a base weight or bias the file holds).
      ``inject_kwargs`` are not allowed then.
    - If ``model`` has no adapter layers, the file's modules are wrapped first with
      ``inject_adapters``: the method from the file (``use_dora`` -> ``"dora"``, or our
      ``"peft_layers"`` field: ``"lora_plus"``, ``"qlora"``, ``"qdora"`` with the recorded
      quantization), each module with its rank and alpha, the file's ``use_rslora``,
      ``lora_dropout`` and ``bias`` mode. ``inject_kwargs`` (``method``, ``quant``, ``dropout``,
      ``bias``, ``compute_dtype``, ...) override these, except what the file fixes: passing
      ``targets``, ``exclude``, ``modules_to_save``, ``rank``, ``alpha``, ``rank_pattern``,
      ``alpha_pattern``, ``use_rslora`` or ``init`` raises ``TypeError``, whether the model has
      adapters or not. ``init_lora_weights="pissa"`` re-creates the PiSSA
      residual of the base as Hugging Face PEFT does. The caller's RNG is not advanced.

    A file holding a targeted layer's full base weight (``<p>.base_layer.weight``, which Hugging
    Face PEFT's ``save_pretrained`` writes for ``lm_head`` and other embedding layers) has it
    copied into the base weight, as Hugging Face PEFT does (a tied weight changes under both its
    names); a quantized base refuses it. A shared module whose other names Hugging Face PEFT would
    leave plain (it adapts the first name only) gives a ``UserWarning`` naming them.

    Everything is checked before the model changes; on any error the model is as it was (an
    injection is undone), also when a warning is turned into an error (``-W error``): warnings
    come before the tensors are copied. Returns ``model``.

    Raises:
        FileNotFoundError: the adapter folder or its files do not exist.
        NotADirectoryError: ``directory`` is a file (such as the weights file itself).
        ValueError: bad files (JSON, truncated or corrupt weights, keys, shapes, ranks, dtypes,
            config against tensors) or files that do not fit the model; a model without adapters
            wrapped in ``DistributedDataParallel`` or holding Hugging Face PEFT's modules (as
            :func:`~peft_layers.inject_adapters`).
        TypeError: a bad argument type, an ``inject_kwargs`` argument the file decides, or
            ``inject_kwargs`` with a model that has adapters.
    """
    _refuse_from_file(inject_kwargs)
    wrapper, model = model, unwrapped(model)  # the files name the model's own modules
    adapter = read_adapter(directory, adapter_name=adapter_name)
    if next(iter_adapter_layers(model), None) is not None:
        if inject_kwargs:
            raise TypeError(
                f"load_adapter(): {sorted(inject_kwargs)} apply only when the model has no adapter layers "
                "(the file's adapters are injected then); this model has adapter layers, which the file fills"
            )
        _fill(model, adapter)
    elif _stacked_layers(model):
        raise ValueError(
            "load_adapter(): the model's adapters are stacked for serving (stack_adapters()); "
            f"stack_adapters(model, {{name: {str(adapter.directory)!r}}}) adds this one beside them, "
            "unload(model) takes the stacks off first"
        )
    else:
        refuse_foreign_wrapping(wrapper, "load_adapter()")
        _inject_and_fill(model, adapter, inject_kwargs)  # a failure, a warning as error too, undoes it
    return wrapper

