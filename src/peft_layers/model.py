"""Model surgery: put adapter layers into a model, take them out, merge, count, freeze.

``inject_adapters(model, targets, method=...)`` replaces the matching linear layers of ``model`` in
place with adapter layers that wrap them (no weight is copied). Everything else is frozen. The
functions here only walk the module tree and swap modules; the math lives in the layers.

Names are the dotted paths of ``model.named_modules()`` ("layers.0.attn.q_proj"). A module that
is reachable under several names (a shared module) gets one adapter, installed under every name.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Union, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._warnings import warn as _warn
from .adapter import is_conv1d, is_conv1d_class, is_sharded, is_transformers_subclass
from .dora import DoRALinear
from .lora import (
    LoRALinear,
    LoRAPlusLinear,
    _argument_hint,
    _layer_arguments,
    is_bitsandbytes_module,
    ranks_above_features_allowed,
)
from .modules_to_save import ModuleToSave
from .qlora import REQUANTIZE_CONSEQUENCE, UNMERGE_REQUANTIZE_CONSEQUENCE, QDoRALinear, QLoRALinear
from .quant import QuantizedLinear

# the public names (the rest is internal, underscore or not); docs/api.md lists them all
__all__ = [
    "ALL_LINEAR",
    "BIAS_MODES",
    "FLOAT_METHOD",
    "METHODS",
    "QUANTIZED_METHOD",
    "TargetSpec",
    "adapter_state_dict",
    "disable_adapters",
    "inject_adapters",
    "inject_lora",
    "is_quantized_linear",
    "iter_adapter_layers",
    "iter_modules_to_save",
    "load_adapter_state_dict",
    "loaded_quantized",
    "merge_adapters",
    "merge_and_unload",
    "method_class",
    "method_of",
    "pattern_key",
    "prepare_for_kbit_training",
    "print_trainable_parameters",
    "trainable_parameters",
    "unload",
    "unmerge_adapters",
    "unwrapped",
]

#: a target or exclude specification: a name suffix, a list of them, a compiled regex (full match
#: on the dotted name), or a callable ``(name, module) -> bool``
TargetSpec = Union[str, Iterable[str], "re.Pattern[str]", Callable[[str, nn.Module], bool]]

METHODS = ("lora", "lora_plus", "dora", "qlora", "qdora")
BIAS_MODES = ("none", "all", "adapter_only")
#: the ``targets`` that stands for every linear layer but the output ones (Hugging Face PEFT's
#: ``target_modules="all-linear"``)
ALL_LINEAR = "all-linear"
#: the heads of sequence classifiers that Hugging Face PEFT leaves out of "all-linear"
_CLASSIFIER_HEADS = ("score", "classifier")


_METHOD_CLASSES: dict[str, type[LoRALinear]] = {
    "lora": LoRALinear,
    "lora_plus": LoRAPlusLinear,
    "dora": DoRALinear,
    "qlora": QLoRALinear,
    "qdora": QDoRALinear,
}


def method_class(method: str) -> type[LoRALinear]:
    """The layer class of ``method`` ("lora", "lora_plus", "dora", "qlora" or "qdora")."""
    if not isinstance(method, str) or method not in _METHOD_CLASSES:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return _METHOD_CLASSES[method]


def method_of(layer: LoRALinear) -> str:
    """The method name of an adapter layer, the inverse of :func:`method_class`."""
    # most derived first: QDoRALinear is a DoRALinear and a QLoRALinear, every class a LoRALinear
    for method in ("qdora", "qlora", "dora", "lora_plus", "lora"):
        if isinstance(layer, _METHOD_CLASSES[method]):
            return method
    raise TypeError(f"layer: expected an adapter layer (a LoRALinear), got {type(layer).__name__}")


def is_quantized_linear(module: nn.Module | None) -> bool:
    """Whether ``module`` is a quantized linear layer: a bitsandbytes ``Linear4bit``/``Linear8bitLt``
    or a :class:`~peft_layers.quant.QuantizedLinear`."""
    return module is not None and (is_bitsandbytes_module(module) or isinstance(module, QuantizedLinear))


#: each quantized method and its float one
FLOAT_METHOD = {"qlora": "lora", "qdora": "dora"}
#: each float method and its quantized one (LoRA+ is an optimizer's matter: QLoRA)
QUANTIZED_METHOD = {"lora": "qlora", "lora_plus": "qlora", "dora": "qdora"}


def loaded_quantized(model: nn.Module) -> bool:
    """Whether transformers loaded ``model``, or a model inside it, in 4 or 8 bits: it holds a
    bitsandbytes layer, or a ``QuantizedLinear`` made from one (the base of a QLoRA layer that
    wraps it, or what ``unload()`` gives back). Its float linear layers were then left float on
    purpose (``_keep_in_fp32_modules``, ``llm_int8_skip_modules``, the output head). Layers
    quantized here (``QuantizedLinear.from_linear``) do not count, nor does a model whose
    quantized layers were all merged back to float (its config may still hold a
    ``quantization_config``). Raises ``TypeError`` unless ``model`` is an ``nn.Module``."""
    _check_model(model)
    return any(
        is_bitsandbytes_module(module) or getattr(module, "from_bitsandbytes", False) for module in model.modules()
    )


class _LoadedQuantized:
    """``scope(name)``: whether the model that the module ``name`` lies in was
    :func:`loaded_quantized`. That model is the root when it is a transformers model (its
    float parts, such as Blip2's Q-Former, lie inside it), else the outermost transformers model
    around ``name`` (a 4-bit model and a float one side by side in a module of the user's), else
    the root."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tops: list[str] = []  # the outermost transformers models, by name
        if not is_transformers_subclass(type(model), "PreTrainedModel"):
            for name, module in model.named_modules(remove_duplicate=False):  # parents come first
                if (
                    name and is_transformers_subclass(type(module), "PreTrainedModel")
                    and not any(name.startswith(top + ".") for top in self.tops)
                ):
                    self.tops.append(name)
        self.answers: dict[str, bool] = {}

    def __call__(self, name: str) -> bool:
        top = next((t for t in self.tops if name == t or name.startswith(t + ".")), "")
        if top not in self.answers:
            self.answers[top] = loaded_quantized(self.model.get_submodule(top) if top else self.model)
        return self.answers[top]


def _layer_method(module: nn.Module, method: str, in_loaded_quantized: bool) -> str:
    """The method that wraps ``module`` when ``method`` is asked for: a quantized method gives a
    float layer of a model :func:`loaded_quantized` (``in_loaded_quantized``) its float method
    (``"qlora"`` -> ``"lora"``), as Hugging Face PEFT picks each layer's class by its base; else
    ``method``."""
    if in_loaded_quantized and method in FLOAT_METHOD and not is_quantized_linear(module):
        return FLOAT_METHOD[method]
    return method


def _accepts(module: nn.Module, method: str) -> bool:
    """Whether ``method`` can wrap ``module``: nn.Linear always; quantized layers for q-methods;
    transformers' Conv1D for the float methods."""
    if isinstance(module, LoRALinear):
        return False
    if method in ("qlora", "qdora"):
        return isinstance(module, (nn.Linear, QuantizedLinear))
    return (isinstance(module, nn.Linear) and not is_bitsandbytes_module(module)) or is_conv1d(module)


def _check_layer_kwargs(method: str, layer_kwargs: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` for a layer argument that the layers of ``method`` do not take, with
    the methods that do take it (or the nearest known name)."""
    accepted = _layer_arguments(method_class(method))  # type: ignore[arg-type]  # a class is hashable (mypy#11470)
    for name, value in layer_kwargs.items():
        if name in accepted:
            continue
        owners = [m for m in METHODS if name in _layer_arguments(_METHOD_CLASSES[m])]  # type: ignore[arg-type]
        if owners:
            hint = f"{name} is an argument of method " + " or ".join(repr(m) for m in owners)
        else:
            known = sorted({a for m in METHODS for a in _layer_arguments(_METHOD_CLASSES[m])})  # type: ignore[arg-type]
            hint = _argument_hint(name, known) or "no method takes it"
        raise TypeError(
            f"{name}: method {method!r} takes no argument {name!r} (got {name}={value!r}); its layer "
            f"arguments are {', '.join(accepted)}; {hint}"
        )


# ---- name matching ---------------------------------------------------------------------------
def _suffix_matches(suffix: str, name: str) -> bool:
    """``suffix`` equals ``name`` or its last dotted components ("q_proj" ~ "l.0.q_proj")."""
    return name == suffix or name.endswith("." + suffix)


def _spec_parts(spec: TargetSpec, argument: str, *, allow_empty: bool = False) -> list[Any]:
    """Split a spec into parts that are each checked for matching something."""
    if isinstance(spec, (str, re.Pattern)) or callable(spec):
        return [spec]
    if isinstance(spec, Iterable):
        parts = list(spec)
        if not parts and not allow_empty:
            raise ValueError(f"{argument}: expected at least one name, got an empty {type(spec).__name__}")
        for part in parts:
            if not isinstance(part, str):
                raise TypeError(
                    f"{argument}: a list must hold name suffixes (str), got {part!r} "
                    f"({type(part).__name__})"
                )
        return parts
    raise TypeError(
        f"{argument}: expected a name suffix, a list of them, a compiled regex or a callable "
        f"(name, module) -> bool, got {type(spec).__name__}"
    )


def _part_matches(part: Any, name: str, module: nn.Module) -> bool:
    if isinstance(part, str):
        return _suffix_matches(part, name)
    if isinstance(part, re.Pattern):
        return part.fullmatch(name) is not None
    return bool(part(name, module))


def _describe(part: Any) -> str:
    if isinstance(part, re.Pattern):
        return f"re.compile({part.pattern!r})"
    if isinstance(part, str):
        return repr(part)
    return getattr(part, "__qualname__", repr(part))


def _nearest_names(part: Any, names: list[str]) -> list[str]:
    """``names`` ordered by likeness to ``part`` (most alike first)."""
    key = part.pattern if isinstance(part, re.Pattern) else part if isinstance(part, str) else ""

    def likeness(name: str) -> float:
        last = name.rsplit(".", 1)[-1]
        return max(
            difflib.SequenceMatcher(None, key, name).ratio(),
            difflib.SequenceMatcher(None, key, last).ratio(),
        )

    return sorted(names, key=likeness, reverse=True)


def pattern_key(patterns: Mapping[str, Any], name: str) -> str | None:
    """The first key of ``patterns`` that matches ``name`` as Hugging Face PEFT matches
    ``rank_pattern``/``alpha_pattern`` keys: the key is a regex that must match a whole dotted
    tail of the name (``re.match(rf"(.*\\.)?({key})$", name)``)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _check_pattern(argument: str, patterns: Any, kind: type) -> dict[str, Any]:
    if patterns is None:
        return {}
    if not isinstance(patterns, Mapping):
        raise TypeError(f"{argument}: expected a dict from name pattern to {kind.__name__}, got {patterns!r}")
    for key, value in patterns.items():
        if not isinstance(key, str):
            raise TypeError(f"{argument}: keys must be name patterns (str), got {key!r}")
        try:  # compiled as it is matched: a global flag such as "(?i)" is valid alone, not there
            re.compile(rf"(.*\.)?({key})$")
        except re.error as error:
            raise ValueError(f"{argument}: key {key!r} is not a valid regex ({error})") from None
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise TypeError(f"{argument}: value for {key!r} must be a {kind.__name__}, got {value!r}")
    return dict(patterns)


# ---- walking the tree --------------------------------------------------------------------------
#: from this many layers on, long model-level operations show a progress bar (on a terminal only)
PROGRESS_MIN_LAYERS = 32


def _progress(items: list, description: str) -> Iterable:
    """``items`` wrapped in a tqdm bar when there are many of them (quantizing a large model
    takes a while); tqdm itself hides the bar when stderr is not a terminal."""
    if len(items) < PROGRESS_MIN_LAYERS:
        return items
    return tqdm(items, desc=description, unit="layer", disable=None, leave=False)


def _module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every dotted name of every module, grouped by module identity (shared modules have several)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _stack_class() -> type[nn.Module]:
    """``serving.MultiLoRALinear``, the layer of adapters stacked for serving (serving builds on
    this module, so it is imported late)."""
    from .serving import MultiLoRALinear

    return MultiLoRALinear


def _enclosing_adapter(model: nn.Module, name: str) -> nn.Module | None:
    """The adapter layer, stack of served adapters or module to save that ``name`` lies inside
    (as its ``base_layer``, ``original``/``trained`` or deeper), or None."""
    holders = (LoRALinear, _stack_class(), ModuleToSave)
    module = model
    for part in name.split(".")[:-1]:
        module = getattr(module, part)
        if isinstance(module, holders):
            return module
    return None


class _AllLinear:
    """The targets ``"all-linear"`` stands for: every layer that ``method`` can wrap, except
    the output layers that Hugging Face PEFT also leaves out (a transformers model's
    ``get_output_embeddings()``, as a language model's ``lm_head``) and a top-level ``score``
    or ``classifier`` head, the modules to save, the ``out_proj`` of an ``nn.MultiheadAttention``
    (which the attention never calls), and what lies inside these or inside an adapter layer.
    With ``"qlora"``/``"qdora"``, a float layer the model keeps unquantized (transformers'
    ``_keep_in_fp32_modules``, T5's ``wo``) gets ``"lora"``/``"dora"``, as Hugging Face PEFT
    gives it its float LoRA layer. With a float method, quantized layers that the method cannot
    wrap are refused (:meth:`refuse_quantized`) rather than left out silently."""

    def __init__(
        self, model: nn.Module, method: str, modules_to_save: TargetSpec | None, scope: Callable[[str], bool]
    ) -> None:
        self.model, self.method, self.scope = model, method, scope
        left_out = [getattr(model, name, None) for name in _CLASSIFIER_HEADS]
        if is_transformers_subclass(type(model), "PreTrainedModel"):  # as Hugging Face PEFT: only these
            left_out.append(cast(Any, model).get_output_embeddings())
        left_out += [m.out_proj for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
        saved = _spec_parts(modules_to_save, "modules_to_save", allow_empty=True) if modules_to_save is not None else []
        left_out += [m for n, m in model.named_modules() if n and any(_part_matches(p, n, m) for p in saved)]
        self.left_out = {id(sub) for module in left_out if isinstance(module, nn.Module) for sub in module.modules()}

    def refuse_quantized(self, exclude_parts: list[Any]) -> None:
        """Raise ``ValueError`` if a float method would leave out quantized layers that are not
        excluded: Hugging Face PEFT adapts them, so leaving them out silently would differ."""
        if self.method in FLOAT_METHOD:
            return
        skipped = [
            n for n, m in self.model.named_modules()
            if is_quantized_linear(m) and id(m) not in self.left_out and not _inside_adapter(self.model, n)
            and not any(_part_matches(e, n, m) for e in exclude_parts)
        ]
        if skipped:
            hint = " (LoRA+ learning rates come from create_loraplus_optimizer)" if self.method == "lora_plus" else ""
            effect = (
                "which wraps them, gives the float layers of a model loaded in 4 or 8 bits the float "
                "method, as Hugging Face PEFT does, and quantizes the others"
            )
            raise ValueError(
                f"targets: 'all-linear' with method {self.method!r} would adapt the float layers only: "
                f"{type(self.model).__name__} has {len(skipped)} quantized linear layer(s) "
                f"({skipped[:3]}{' ...' if len(skipped) > 3 else ''}), which method {self.method!r} cannot "
                f"wrap; use method={QUANTIZED_METHOD[self.method]!r}{hint}, {effect}; or exclude them"
            )

    def warn_fused_experts(self) -> None:
        """Warn if the model holds stacked expert weights (transformers 5 stores a mixture of
        experts as 3-D parameters of one module, its class named ``...Experts``): "all-linear"
        adapts linear layers only, while Hugging Face PEFT 0.21 adapts those too
        (``target_parameters``)."""
        holders = [
            name for name, module in self.model.named_modules()
            if type(module).__name__.endswith("Experts") and not _inside_adapter(self.model, name)
            and any(parameter.dim() == 3 for parameter in module.parameters(recurse=False))
        ]
        if holders:
            _warn(
                f"targets: 'all-linear' adapts linear layers only; {type(self.model).__name__} also holds "
                f"stacked expert weights (3-D parameters, a fused mixture of experts) in {len(holders)} "
                f"module(s) ({holders[:3]}{' ...' if len(holders) > 3 else ''}), which get no adapter "
                "here, while Hugging Face PEFT adapts them (target_parameters), so the two libraries' "
                "'all-linear' adapters for this model differ",
            )

    def __call__(self, name: str, module: nn.Module) -> bool:
        return (
            _accepts(module, _layer_method(module, self.method, self.scope(name)))
            and id(module) not in self.left_out and not _inside_adapter(self.model, name)
        )

    def __repr__(self) -> str:
        return repr(ALL_LINEAR)


def _inside_adapter(model: nn.Module, name: str) -> bool:
    """Whether ``name`` lies inside an adapter layer or a stack (its ``base_layer`` or deeper)."""
    return _enclosing_adapter(model, name) is not None


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@contextlib.contextmanager
def _undo_on_error(model: nn.Module, modules: Iterable[nn.Module], *, values: bool = False) -> Iterator[None]:
    """If the body raises, put ``model`` back as it was before it ran, then re-raise.

    Put back: each of ``modules`` under every name it had (so a replacement installed in its place
    comes out), the ``requires_grad`` flag of every parameter of ``model``, and for each of
    ``modules`` and its submodules the parameter and buffer objects, their storage and plain
    attributes (``training``, a quantized layer's ``version``, ...). With ``values`` also the
    contents of those tensors, which PiSSA rewrites in place; that copy costs memory, so only then.
    """
    modules = list(modules)
    all_names = _module_names(model)
    placed = [(name, module) for module in modules for name in all_names.get(id(module), []) if name]
    grad_flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    states = []  # (submodule, its parameter dict, buffer dict, plain attributes)
    tensors = []  # (tensor, its storage, a copy of its values or None)
    for module in modules:
        for sub in module.modules():
            plain = {k: v for k, v in vars(sub).items() if not isinstance(v, dict)}
            states.append((sub, dict(sub._parameters), dict(sub._buffers), plain))
            for tensor in [*sub._parameters.values(), *sub._buffers.values()]:
                if tensor is not None:
                    tensors.append((tensor, tensor.data, tensor.detach().clone() if values else None))
    try:
        yield
    except BaseException:
        for name, module in placed:
            _set_module(model, name, module)
        for sub, parameters, buffers, plain in states:
            sub._parameters.clear()
            sub._parameters.update(parameters)
            sub._buffers.clear()
            sub._buffers.update(buffers)
            vars(sub).update(plain)
        with torch.no_grad():
            for tensor, storage, copy in tensors:
                tensor.data = storage
                if copy is not None:
                    storage.copy_(copy)
        for parameter, flag in grad_flags:
            parameter.requires_grad_(flag)
        raise


def _refuse_sharded(tensors: Iterable[Any], caller: str) -> None:
    """Raise ``ValueError`` if any of ``tensors`` is sharded: the adapter tools read and write
    whole tensors."""
    if any(is_sharded(tensor) for tensor in tensors):
        raise ValueError(
            f"{caller}: the model's tensors are sharded (DTensors of FSDP2's fully_shard). Load adapters "
            "before fully_shard(); to save, gather on every rank, state = {k: v.full_tensor() for k, v in "
            "adapter_state_dict(model).items()}, then on one rank load_adapter_state_dict() it into the "
            "same model built without fully_shard and save_adapter() that (docs/model.md)"
        )


def _check_model(model: Any) -> None:
    """Raise ``TypeError`` unless ``model`` is an ``nn.Module`` (the first check of every tool)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")


#: what the wrappers :func:`unwrapped` sees through put before every name
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside the wrappers that rename every module: ``torch.compile``'s
    ``OptimizedModule`` (names under ``_orig_mod.``), ``DistributedDataParallel`` and
    ``DataParallel`` (under ``module.``). Adapter files and adapter state dicts use the model's own
    names, so that a compiled or data-parallel model saves files a plain one loads, both ways."""
    _check_model(model)
    # torch._dynamo is imported by torch.compile: a model it wrapped finds it in sys.modules
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    compiled = getattr(eval_frame, "OptimizedModule", ())
    while True:
        if compiled and isinstance(model, compiled):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def iter_adapter_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Each adapter layer of ``model`` once, with its first dotted name."""
    _check_model(model)
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def iter_modules_to_save(model: nn.Module) -> Iterator[tuple[str, ModuleToSave]]:
    """Each :class:`ModuleToSave` of ``model`` once, with its first dotted name."""
    for name, module in model.named_modules():
        if isinstance(module, ModuleToSave):
            yield name, module


def _stacked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Each ``MultiLoRALinear`` of ``model`` (adapters stacked for serving) once, with its name."""
    stack_class = _stack_class()
    return [(name, module) for name, module in model.named_modules() if isinstance(module, stack_class)]


def _refuse_stacks_only(model: nn.Module, caller: str) -> None:
    """Raise :func:`_adapter_layers_or_raise`'s error for a model whose adapters are all stacked
    for serving (a model without any adapters passes: ``caller`` decides what that means)."""
    if _stacked_layers(model) and next(iter_adapter_layers(model), None) is None:
        _adapter_layers_or_raise(model, caller)


def _adapter_layers_or_raise(model: nn.Module, caller: str) -> list[tuple[str, LoRALinear]]:
    layers = list(iter_adapter_layers(model))
    if not layers:
        if _stacked_layers(model):
            raise ValueError(
                f"{caller}: the model's adapters are stacked for serving (stack_adapters()), which "
                f"{caller} does not work on; unload(model) takes the stacks off (load_adapter() then "
                "puts one adapter on as trainable layers)"
            )
        raise ValueError(f"{caller}: model has no adapter layers; call inject_adapters() first")
    return layers


# ---- inject ------------------------------------------------------------------------------------
def inject_adapters(
    model: nn.Module,
    targets: TargetSpec,
    method: str = "lora",
    bias: str = "none",
    *,
    exclude: TargetSpec | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    modules_to_save: TargetSpec | None = None,
    **layer_kwargs: Any,
) -> nn.Module:
    """Replace the linear layers that ``targets`` names with adapter layers, in place.

    Each match ``lin`` becomes ``method_class(method).from_linear(lin, **layer_kwargs)``, so the
    model computes ``y = lin(x) + delta(x)`` there, with the delta of the method (LoRA:
    ``s (x A^T) B^T``). Then every parameter of ``model`` is frozen except the adapter tensors and
    the biases that ``bias`` names.

    Args:
        model: any ``nn.Module``; changed in place and returned.
        targets: a name suffix matched on whole dotted components (``"q_proj"`` matches
            ``"layers.0.attn.q_proj"``, not ``"layers.0.attn.xq_proj"``), a list of them (each
            must match something), a compiled regex (full match on the dotted name), a
            callable ``(name, module) -> bool``, or ``"all-linear"``: every layer the method can
            wrap but the output ones (a transformers model's ``get_output_embeddings()``, a
            top-level ``score`` or ``classifier``), the modules to save and the ``out_proj`` of
            ``nn.MultiheadAttention``, as Hugging Face PEFT's shorthand.
        method: ``"lora"``, ``"lora_plus"``, ``"dora"``, ``"qlora"`` or ``"qdora"``. The last two
            wrap bitsandbytes ``Linear4bit``/``Linear8bitLt`` and ``QuantizedLinear`` layers as
            they are and quantize float ones, but in a model transformers loaded in 4 or 8 bits
            (:func:`loaded_quantized`) the float linear layers were left float on purpose (T5's
            ``wo``, ``llm_int8_skip_modules``, the output head), and get ``"lora"``/``"dora"``,
            as in Hugging Face PEFT.
        bias: ``"none"`` (no bias trains), ``"all"`` (every bias of the model trains) or
            ``"adapter_only"`` (the biases of the wrapped layers train).
        exclude: names to leave alone, in the same forms as ``targets``.
        rank_pattern, alpha_pattern: per-layer ``rank``/``alpha``, keyed by name patterns matched
            as Hugging Face PEFT matches them (see :func:`pattern_key`); the first matching key wins.
        modules_to_save: modules that train in full and are saved with the adapter (Hugging Face
            PEFT's ``modules_to_save``: a new classifier head, a norm), in the forms of
            ``targets`` (an empty list: none); each becomes a
            :class:`~peft_layers.ModuleToSave` holding the module (frozen) and a trained copy.
            Any module type but quantized ones; not a target, nor inside or around one.
        **layer_kwargs: passed to the layer's ``from_linear``: ``rank``, ``alpha``, ``dropout``,
            ``use_rslora``, ``init`` for every method, plus ``lr_ratio`` ("lora_plus"),
            ``epsilon`` ("dora", "qdora"), ``quant``, ``blocksize``, ``double_quant``,
            ``compute_dtype`` ("qlora", "qdora").

    A module reachable under several names is wrapped once, and that one adapter layer is put
    under every name. Each new layer takes the training mode of the module it replaces (in an
    ``eval()`` model its dropout is off). Raises ``ValueError`` if a target matches nothing (the
    message lists the linear layers, nearest first), if a match already is an adapter layer or
    lies inside one; ``TypeError`` if a match is not a linear layer the method can wrap or a layer
    argument is not one the method takes; and the layer's own error, prefixed with the module's
    name, for a value it rejects. Nothing is changed when an error is raised (no flag, no weight,
    not even a PiSSA residual).
    """
    _check_model(model)
    if isinstance(modules_to_save, Iterable) and not isinstance(modules_to_save, (str, re.Pattern)):
        # read once (a generator is asked twice under "all-linear"); [] saves none, as in Hugging Face PEFT
        modules_to_save = list(modules_to_save) or None
    cls = method_class(method)
    _check_layer_kwargs(method, layer_kwargs)
    if bias not in BIAS_MODES:
        raise ValueError(f"bias: expected one of {BIAS_MODES}, got {bias!r}")
    rank_pattern = _check_pattern("rank_pattern", rank_pattern, int)
    alpha_pattern = _check_pattern("alpha_pattern", alpha_pattern, float)
    # whether a module lies in a model loaded quantized (asked of quantized methods only)
    scope: Callable[[str], bool] = _LoadedQuantized(model) if method in FLOAT_METHOD else (lambda name: False)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:  # any case, as Hugging Face PEFT
        targets = _AllLinear(model, method, modules_to_save, scope)
    target_parts = _spec_parts(targets, "targets")
    exclude_parts = _spec_parts(exclude, "exclude", allow_empty=True) if exclude is not None else []
    if isinstance(targets, _AllLinear):
        targets.refuse_quantized(exclude_parts)

    all_names = _module_names(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    linear_names = [
        n for n, m in modules.items()
        if n and _accepts(m, _layer_method(m, method, scope(n))) and not _inside_adapter(model, n)
    ]

    chosen: dict[int, str] = {}  # id of each module to wrap -> its method, in order of first match
    kept = _keep_in_fp32_lists(model) if method in FLOAT_METHOD else []
    for part in target_parts:
        hits = [n for n, m in modules.items() if n and _part_matches(part, n, m)]
        if not hits:
            nearest = _nearest_names(part, linear_names)[:20]
            # Hugging Face PEFT reads a str as a regex; here it never is
            hint = ""
            if isinstance(part, str) and part.lower() == ALL_LINEAR:
                hint = f"; {ALL_LINEAR!r} stands for every linear layer as targets itself, not in a list"
            elif isinstance(part, _AllLinear) and method in FLOAT_METHOD and any(map(is_conv1d, modules.values())):
                hint = (
                    f"; method {method!r} quantizes nn.Linear layers only, and this model's layers are "
                    f"transformers Conv1D: give them {FLOAT_METHOD[method]!r}, or load the model in 4 or "
                    f"8 bits with transformers, whose quantized layers {method!r} wraps"
                )
            elif isinstance(part, str) and re.search(r"[\\*+?|()\[\]^$]", part):
                hint = "; a str is a name suffix, never a regex: pass re.compile(...) or a callable"
            elif not linear_names and _accepts(model, _layer_method(model, method, scope(""))):
                hint = (
                    "; the model is itself a linear layer, which cannot be replaced in place: wrap it "
                    f"with {method_class(method).__name__}.from_linear(model)"
                )
            raise ValueError(
                f"targets: {_describe(part)} matches no module of {type(model).__name__}; "
                f"its linear layers are (nearest first): {nearest}{hint}"
            )
        for name in hits:
            module = modules[name]
            if any(_part_matches(e, name, module) for e in exclude_parts):
                continue
            holder = module if isinstance(module, LoRALinear) else _enclosing_adapter(model, name)
            if isinstance(holder, ModuleToSave) or isinstance(module, ModuleToSave):
                raise ValueError(
                    f"targets: {name!r} is or lies inside a module to save (ModuleToSave), which trains "
                    "in full; a module trains either through an adapter or in full, not both"
                )
            if holder is not None:
                raise ValueError(
                    f"targets: {name!r} already has an adapter ({type(holder).__name__}); "
                    "injecting twice into a layer is not allowed (unload() first)"
                )
            if isinstance(module, _stack_class()):
                raise ValueError(
                    f"targets: {name!r} holds adapters stacked for serving (stack_adapters()); "
                    "stack_adapters() adds more, unload(model) takes the stacks off first"
                )
            layer_method = _layer_method(module, method, scope(name))
            if not _accepts(module, layer_method):
                allowed = "nn.Linear or transformers Conv1D"
                if method in FLOAT_METHOD:
                    allowed = "nn.Linear, bitsandbytes Linear4bit/Linear8bitLt or QuantizedLinear"
                    if scope(name):
                        allowed += " (and transformers Conv1D, a float layer of a model loaded quantized)"
                kind = type(module).__name__
                article = "an" if kind[:1].lower() in "aeiou" else "a"
                raise TypeError(
                    f"targets: {_describe(part)} matches {name!r}, {article} {kind}; "
                    f"method {method!r} wraps {allowed} only"
                )
            if isinstance(targets, _AllLinear) and _kept_unquantized(kept, module, name, layer_method):
                layer_method = FLOAT_METHOD[layer_method]  # as Hugging Face PEFT: LoRA/DoRA on a layer kept float
            else:
                _check_called(model, modules, name, layer_method, kept)
            # a module shared between a model loaded quantized and a float one: float in one of
            # them, it stays float
            earlier = chosen.get(id(module), layer_method)
            chosen[id(module)] = layer_method if earlier in FLOAT_METHOD else earlier
    if not chosen:
        raise ValueError(f"targets: every match of {targets!r} is excluded by exclude={exclude!r}")
    _refuse_nested_targets(modules, chosen, all_names)
    _refuse_split_shared_targets(modules, chosen, all_names, exclude_parts)
    # like a target, an exclusion or a per-layer pattern that matches nothing is a typo to report;
    # a callable is the caller's own test, asked about target matches only (as it always was)
    for part in exclude_parts:
        if callable(part) and not isinstance(part, re.Pattern):
            continue
        if not any(name and _part_matches(part, name, module) for name, module in modules.items()):
            nearest = _nearest_names(part, linear_names)[:20]
            raise ValueError(
                f"exclude: {_describe(part)} matches no module of {type(model).__name__}; "
                f"its linear layers are (nearest first): {nearest}"
            )
    target_names = [name for module_id in chosen for name in all_names[module_id]]
    for argument, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for key in patterns:
            if not any(pattern_key({key: None}, name) for name in target_names):
                nearest = _nearest_names(key, target_names)[:20]
                raise ValueError(
                    f"{argument}: key {key!r} matches none of the targets (as a regex on a whole dotted "
                    f"tail of their names); the targets are (nearest first): {nearest}"
                )

    saved = _choose_modules_to_save(model, modules_to_save, modules, chosen) if modules_to_save is not None else []

    if isinstance(targets, _AllLinear):
        targets.warn_fused_experts()

    # building a layer freezes the module it wraps and PiSSA rewrites its weight: a failure at a
    # later module must undo that
    wrapped = [modules[all_names[module_id][0]] for module_id in chosen]
    pissa = layer_kwargs.get("init") == "pissa"
    # a quantized method quantizes a copy or wraps a quantized layer: the holders stay apart
    floats = [module for module in wrapped if chosen[id(module)] not in FLOAT_METHOD]
    if floats:
        _warn_tied(model, [(all_names[id(module)], module) for module in floats], pissa=pissa)
    _warn_tied_saved(model, [(all_names[id(module)], module) for module in saved])
    with _undo_on_error(model, [*wrapped, *saved], values=pissa):
        # every new layer is built before the first is installed
        replacements: list[tuple[list[str], LoRALinear]] = []
        for module_id in _progress(list(chosen), f"inject_adapters({method})"):
            names = all_names[module_id]
            first = names[0]
            kwargs = dict(layer_kwargs)
            # a shared module's names are tried in order: a key may name any of them
            rank_key = next(filter(None, (pattern_key(rank_pattern, name) for name in names)), None)
            if rank_key is not None:
                kwargs["rank"] = rank_pattern[rank_key]
            pattern = next(filter(None, (pattern_key(alpha_pattern, name) for name in names)), None)
            if pattern is not None:
                kwargs["alpha"] = alpha_pattern[pattern]
            layer_cls = cls
            if chosen[module_id] != method:  # a float layer under a quantized method: no quant arguments
                layer_cls = method_class(chosen[module_id])
                kwargs = {k: v for k, v in kwargs.items() if k in _layer_arguments(layer_cls)}  # type: ignore[arg-type]
            # "all-linear" names no layer: as Hugging Face PEFT, a layer narrower than the rank takes
            # it (its update has rank min(in, out) at most); a rank_pattern entry names the layer
            # and keeps the bound, and so does PiSSA, whose split needs rank singular vectors
            relaxed = isinstance(targets, _AllLinear) and rank_key is None and not pissa
            with ranks_above_features_allowed() if relaxed else contextlib.nullcontext():
                replacements.append((names, _build_layer(layer_cls, first, modules[first], kwargs)))
        copies: list[tuple[list[str], nn.Module]] = [(all_names[id(m)], ModuleToSave(m)) for m in saved]
        for names, new in [*replacements, *copies]:
            for name in names:
                _set_module(model, name, new)
        _freeze_all_but_adapters(model, bias)
    return model


def _refuse_nested_targets(modules: dict[str, nn.Module], chosen: Mapping[int, str], all_names: dict[int, list[str]]) -> None:
    """Raise ``ValueError`` if a chosen target lies inside another (a linear layer holding a
    linear child): the outer adapter layer would hold the inner one where its base's forward
    never calls it."""
    for module_id in chosen:
        outer = modules[all_names[module_id][0]]
        inner = [name for name, child in outer.named_modules() if name and id(child) in chosen]
        if inner:
            raise ValueError(
                f"targets: {all_names[module_id][0]!r} and modules inside it ({inner}) all match; an "
                "adapter layer around the outer one would hide the inner ones from its base's forward; "
                "exclude one or the other"
            )


def _refuse_split_shared_targets(
    modules: dict[str, nn.Module], chosen: Mapping[int, str], all_names: dict[int, list[str]], exclude_parts: list[Any]
) -> None:
    """Raise ``ValueError`` if ``exclude`` names one of the names of a shared target but not all:
    the one module takes one adapter layer, under all its names."""
    for module_id in chosen:
        names = all_names[module_id]
        module = modules[names[0]]
        excluded = [name for name in names if any(_part_matches(e, name, module) for e in exclude_parts)]
        if excluded:
            raise ValueError(
                f"exclude: {excluded} name the module that is also at "
                f"{[n for n in names if n not in excluded]} (one module under several names), which a "
                "target matches; a shared module takes one adapter layer under all its names, so "
                "exclude all of them, or give the excluded place a module of its own"
            )


def _module_to_save_refusal(
    model: nn.Module, name: str, module: nn.Module, targets: Iterable[int]
) -> tuple[type[Exception], str] | None:
    """Why ``module`` (``name`` in ``model``) cannot become a module to save, as the error type
    and its reason, or None when it can: it is, or lies inside, an adapter layer or a module to
    save; it is or holds one of ``targets`` (module ids) or an adapter layer; it is or holds a
    quantized layer or a module with extra state. ``inject_adapters`` and ``load_adapter`` both
    ask it, each naming its own argument."""
    inner = list(module.modules())
    holder = _enclosing_adapter(model, name)
    if holder is not None or isinstance(module, (LoRALinear, ModuleToSave, _stack_class())):
        kind = type(holder if holder is not None else module).__name__
        return ValueError, (
            f"{name!r} is or lies inside a {kind}; a module to save is a plain module of the model "
            "(unload() first)"
        )
    targets = set(targets)
    parts = name.split(".")
    ancestors = [model.get_submodule(".".join(parts[:end])) for end in range(len(parts))]
    if any(id(ancestor) in targets for ancestor in ancestors):
        return ValueError, (
            f"{name!r} lies inside an adapter target, whose adapter layer's base would call it, not "
            "a module to save put in its place; a module trains either through an adapter or in full"
        )
    if any(isinstance(m, (LoRALinear, _stack_class())) or id(m) in targets for m in inner):
        return ValueError, (
            f"{name!r} is or holds an adapter target; a module trains either through an adapter or "
            "in full, not both"
        )
    if any(is_quantized_linear(m) for m in inner):
        return TypeError, (
            f"{name!r} is or holds a quantized layer, whose weight cannot train in full; target it "
            "with method 'qlora' instead"
        )
    if any(type(m).get_extra_state is not nn.Module.get_extra_state for m in inner):
        return TypeError, (
            f"{name!r} is or holds a module with extra state (get_extra_state), which adapter files "
            "hold no place for"
        )
    return None


def _choose_modules_to_save(
    model: nn.Module, spec: TargetSpec, modules: dict[str, nn.Module], targets: Mapping[int, object]
) -> list[nn.Module]:
    """The modules ``spec`` names (``inject_adapters``' ``modules_to_save``), each once, checked:
    every part matches; no match is or holds an adapter layer or a target, or is quantized."""
    chosen: dict[int, nn.Module] = {}
    hugging_face_only: list[str] = []
    for part in _spec_parts(spec, "modules_to_save"):
        hits = [n for n, m in modules.items() if n and _part_matches(part, n, m)]
        if isinstance(part, str):  # Hugging Face PEFT's rule: a plain string suffix
            hugging_face_only += [
                n for n, m in modules.items()
                if n.endswith(part) and _module_to_save_refusal(model, n, m, targets) is None
            ]
        if not hits:
            nearest = _nearest_names(part, [n for n in modules if n and not _inside_adapter(model, n)])[:20]
            raise ValueError(
                f"modules_to_save: {_describe(part)} matches no module of {type(model).__name__}; "
                f"its modules are (nearest first): {nearest}"
            )
        for name in hits:
            refusal = _module_to_save_refusal(model, name, modules[name], targets)
            if refusal is not None:
                error, reason = refusal
                raise error(f"modules_to_save: {reason}")
            chosen.setdefault(id(modules[name]), modules[name])
    names = {id(module): name for name, module in modules.items() if id(module) in chosen}
    for outer in chosen.values():
        inner = [names[id(m)] for m in outer.modules() if m is not outer and id(m) in chosen]
        if inner:  # the inner wrapper would hang off the outer one, never called
            raise ValueError(
                f"modules_to_save: {inner} lie inside {names[id(outer)]!r}, which is saved whole; "
                "name one or the other"
            )
    # not those named by another part, nor those inside a module saved whole
    inside = tuple(f"{name}." for name, module in modules.items() if id(module) in chosen)
    hugging_face_only = [n for n in hugging_face_only if id(modules[n]) not in chosen and not n.startswith(inside)]
    if hugging_face_only:
        _warn(
            f"modules_to_save: a name matches whole dotted components here, as targets do, so "
            f"{sorted(hugging_face_only)} are not trained in full; Hugging Face PEFT matches plain "
            "string suffixes and would train them in full too. Name them as well to train them as "
            "it does"
        )
    return list(chosen.values())


def _tied(
    model: nn.Module, modules: list[tuple[list[str], nn.Module]], *, weight_only: bool
) -> dict[str, list[str]]:
    """First name of each of ``modules`` whose weight (``weight_only``) or any parameter other
    modules share -> the names those holders give it (a head tied to the embedding)."""
    holders: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(parameter), []).append(name)
    tied = {}
    for names, module in modules:
        own = tuple(f"{name}." for name in names)
        shared = [getattr(module, "weight", None)] if weight_only else list(module.parameters())
        others = [n for p in shared for n in holders.get(id(p), []) if not n.startswith(own)]
        if others:
            tied[names[0]] = others
    return tied


def _warn_tied_saved(model: nn.Module, saved: list[tuple[list[str], nn.Module]]) -> None:
    tied = _tied(model, saved, weight_only=False)
    if tied:
        _warn(
            f"inject_adapters(): {tied} share their weights with modules to save (tied weights): "
            "the trained copy unties them (the other holders keep the original weight, as in "
            "Hugging Face PEFT), and transformers' save_pretrained() of the model cannot save the "
            "shared original under its new name; save the adapter with save_adapter(), or "
            "merge_and_unload() first",
        )


def _warn_tied(model: nn.Module, targets: list[tuple[list[str], nn.Module]], *, pissa: bool) -> None:
    """Warn for targets whose weight other modules share (a head tied to the embedding), and, for
    PiSSA, that its residual changes the other holders' weight at once (as in Hugging Face PEFT,
    whose PiSSA files of tied heads hold that residual)."""
    tied = _tied(model, targets, weight_only=True)
    if tied:
        pissa_note = (
            "init='pissa' writes the residual W0 - s B A into the shared weight, so the other "
            "holders change now (exclude these targets to keep them); " if pissa else ""
        )
        _warn(
            f"inject_adapters(): {tied} share their weights with the targets (tied weights): {pissa_note}"
            "merge_adapters() writes the merge into every holder (merge_and_unload() gives the target "
            "its own merged weight), and transformers' save_pretrained() of the unmerged model cannot "
            "save the shared tensor under its new name; save the adapter with save_adapter()",
        )


def _check_called(
    model: nn.Module, modules: dict[str, nn.Module], name: str, method: str, kept: list[tuple[str, list[str]]]
) -> None:
    """Refuse a linear layer that its model never calls as a module, or whose weight dtype the
    model reads (``kept``: :func:`_keep_in_fp32_lists`), where an adapter would silently do
    nothing or break the forward."""
    parent_name, _, child = name.rpartition(".")
    if child == "out_proj" and isinstance(modules.get(parent_name), nn.MultiheadAttention):
        raise TypeError(
            f"targets: {name!r} is the out_proj of an nn.MultiheadAttention, which reads its weight "
            "directly and never calls it: an adapter there would do nothing; exclude it"
        )
    hits = _kept_unquantized(kept, modules[name], name, method)
    if hits:
        raise TypeError(
            f"targets: {name!r} is kept unquantized by its transformers model's _keep_in_fp32_modules "
            f"({hits}): the model casts activations to its weight's dtype, which a quantized "
            f"weight does not have, so method {method!r} cannot quantize it; exclude it, or give "
            f"it method {FLOAT_METHOD[method]!r} in a call of its own ('all-linear' does that by itself)"
        )


def _keep_in_fp32_lists(model: nn.Module) -> list[tuple[str, list[str]]]:
    """``(prefix, entries)`` of transformers' ``_keep_in_fp32_modules`` (and ``_strict``) of every
    model inside ``model``: the root, or a transformers model in a module of the user's."""
    lists = []
    for prefix, module in model.named_modules(remove_duplicate=False):  # a shared model under each name
        entries = [*(getattr(module, "_keep_in_fp32_modules", None) or ()),
                   *(getattr(module, "_keep_in_fp32_modules_strict", None) or ())]
        if entries:
            lists.append((prefix, [k for k in entries if isinstance(k, str)]))
    return lists


def _kept_unquantized(kept: list[tuple[str, list[str]]], module: nn.Module, name: str, method: str) -> list[str]:
    """The entries of ``kept`` (:func:`_keep_in_fp32_lists`) that keep ``module`` (``name``), a
    float linear layer that the quantized ``method`` would quantize, unquantized: those of the
    models it lies in, matched as name suffixes. Empty for another module or method."""
    if method not in FLOAT_METHOD or not isinstance(module, nn.Linear) or is_quantized_linear(module):
        return []
    return sorted({
        k for prefix, entries in kept if not prefix or name.startswith(prefix + ".")
        for k in entries if _suffix_matches(k, name)
    })


def _build_layer(cls: type[LoRALinear], name: str, module: nn.Module, kwargs: dict[str, Any]) -> LoRALinear:
    """``cls.from_linear(module, **kwargs)`` in the training mode of ``module``; an argument the
    layer rejects raises the layer's error type, with the module's name in front."""
    try:
        layer = cls.from_linear(module, **kwargs)
    except (TypeError, ValueError) as error:
        if type(error) not in (TypeError, ValueError):  # a subclass may take other arguments
            raise
        raise type(error)(f"inject_adapters(): module {name!r}: {error}") from None
    # a new module starts in training mode: in an eval() model its dropout would run
    layer.train(module.training)
    return layer


def inject_lora(model: nn.Module, targets: TargetSpec, **kwargs: Any) -> nn.Module:
    """:func:`inject_adapters` with ``method="lora"``: the plain LoRA layers of the model."""
    return inject_adapters(model, targets, method="lora", **kwargs)


def _freeze_all_but_adapters(model: nn.Module, bias: str) -> None:
    model.requires_grad_(False)
    for _, layer in iter_adapter_layers(model):
        for parameter in layer.adapter_parameters():
            parameter.requires_grad_(True)
        if bias == "adapter_only" and layer.bias is not None:
            layer.bias.requires_grad_(True)
    if bias == "all":
        for name, parameter in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                parameter.requires_grad_(True)
    for _, saved in iter_modules_to_save(model):  # the original stays as it was, even its bias
        saved.original.requires_grad_(False)
        saved.trained.requires_grad_(True)


# ---- merge / unload --------------------------------------------------------------------------
def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every adapter layer: ``W0 <- W0 + delta`` (see ``layer.merge()``); returns ``model``.

    Raises ``ValueError`` (changing nothing) if a layer is already merged or disabled, if a base
    weight is computed (a parametrization), or if an adapter holds NaN or inf.
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
    with _one_requantize_warning([layer for _, layer in layers], "merge_adapters()"):
        for _, layer in _progress(layers, "merge_adapters()"):  # a quantized base requantizes: slow
            layer.merge()
    return model


def _refuse_shared_base_weights(layers: list[tuple[str, LoRALinear]]) -> None:
    """Raise ``ValueError`` if two adapter layers' base weights share storage (targets with tied
    weights): each merge would add its update into the other's weight too, and both layers would
    compute ``W0 + delta_1 + delta_2``."""
    by_storage: dict[tuple[torch.device, int], list[tuple[str, range]]] = {}
    for name, layer in layers:
        weight = cast(Tensor, layer.base_layer.weight)
        if isinstance(layer.base_layer, QuantizedLinear) or is_sharded(weight):
            continue  # codes of its own; a shard has no storage here (and LoRA merges it shard by shard)
        address = weight.untyped_storage().data_ptr()
        if address:  # 0: no storage (meta tensors)
            by_storage.setdefault((weight.device, address), []).append((name, _element_span(weight)))
    shared = []
    for held in by_storage.values():
        overlapping = [
            name for name, span in held if any(_overlap(span, other) for other_name, other in held if other_name != name)
        ]
        if overlapping:
            shared.append(overlapping)
    if shared:
        raise ValueError(
            f"merge_adapters(): the adapter layers {shared} share one base weight (tied weights), so "
            "each merge would add its update into the others' weight too; merge_and_unload() gives "
            "each layer a merged weight of its own"
        )


def _element_span(tensor: Tensor) -> range:
    """The storage elements ``tensor`` reads, from its first to its last (views of one fused
    weight, such as the slices of a QKV projection, have spans that do not overlap)."""
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


def _replace_layers(
    model: nn.Module, layers: list[tuple[str, Any]], build: Callable[[Any], nn.Module], caller: str
) -> None:
    """Put ``build(layer)`` in place of each layer, under every name the layer has."""
    names = _module_names(model)
    new_modules = [(names[id(layer)], build(layer)) for _, layer in _progress(layers, caller)]
    for layer_names, new in new_modules:
        for name in layer_names:
            _set_module(model, name, new)


def merge_and_unload(model: nn.Module, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every adapter layer with a plain ``nn.Linear`` holding ``W0 + delta`` (a
    transformers ``Conv1D``, in its ``(in, out)`` layout, for a ``Conv1D`` base), and every
    module to save (:class:`~peft_layers.ModuleToSave`) with its trained copy.

    The merge is exact in float: a quantized base is dequantized (never requantized). ``dtype``
    is the dtype of the new weights. By default: for a dense base, its weight's dtype; for a
    quantized base, the dtype that holds most of the model's other float parameters (float32
    after :func:`prepare_for_kbit_training`), so that the plain ``nn.Linear``, which casts no
    input, fits between its neighbours as the adapter layer did; the compute dtype when the
    model has no other float parameters. The new layers' weight and bias require grad as the
    bases' did (frozen, but for a bias that ``bias="all"`` trained or a weight the caller
    unfroze), and a module to save becomes its trained copy as it is, as in Hugging Face PEFT.
    A ``dtype`` other than that of the layers around them gives layers that the next forward
    feeds inputs of another dtype (``nn.Linear`` casts none): cast the whole model with it
    (``model.to(dtype)``), as the merge casts only what it builds.
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
    layers = _adapter_layers_or_raise(model, "merge_and_unload()")
    # a disabled adapter would be dropped from the merged weight: ambiguous, so refused
    disabled = [name for name, layer in layers if not layer.adapter_enabled]
    if disabled:
        raise ValueError(
            f"merge_and_unload(): these layers have their adapter disabled: {disabled}; enable them "
            "(adapter_enabled = True) to merge them, or unload() to drop the adapters"
        )

    _refuse_sharded_layers(layers, "merge_and_unload()")
    neighbours = _surrounding_dtype(model, layers)

    def build(layer: LoRALinear) -> nn.Module:
        quantized = isinstance(layer.base_layer, QuantizedLinear)
        linear = layer.to_linear(dtype or (quantized and neighbours) or layer.compute_dtype)
        # the model's own layout: a Conv1D base, or one transformers quantized from a Conv1D
        source = type(layer.base_layer) if layer.fan_in_fan_out else getattr(layer.base_layer, "source_cls", None)
        merged = _as_conv1d(linear, source) if is_conv1d_class(source) else linear
        _take_requires_grad(merged, layer.base_layer)
        return merged

    _replace_layers(model, layers, build, "merge_and_unload()")
    _replace_layers(model, list(iter_modules_to_save(model)), _trained_copy, "merge_and_unload()")
    dequantized = sum(isinstance(layer.base_layer, QuantizedLinear) for _, layer in layers)
    config = getattr(model, "config", None)
    if dequantized and getattr(config, "quantization_config", None) is not None:
        _warn(
            f"merge_and_unload(): {dequantized} merged layer(s) are float now, inside a model that "
            "transformers loaded quantized (its config keeps quantization_config, its other layers "
            "stay quantized), and save_pretrained() of that mix does not load back. For a merged "
            "float checkpoint, load the base model in float, load_adapter(..., method='lora' or "
            "'dora'), then merge_and_unload()",
        )
    return model


def _trained_copy(saved: ModuleToSave) -> nn.Module:
    """A module to save after ``merge_and_unload``: its trained copy, as it is (trainable, as in
    Hugging Face PEFT)."""
    return saved.trained


def _take_requires_grad(merged: nn.Module, base: nn.Module) -> None:
    """Give the merged layer's weight and bias the ``requires_grad`` of the base's (a bias that
    ``bias="all"`` trained stays trainable; a quantized base's codes are never trainable)."""
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


def _surrounding_dtype(model: nn.Module, layers: list[tuple[str, LoRALinear]]) -> torch.dtype | None:
    """The dtype of most float values among ``model``'s parameters outside ``layers`` (packed
    4-bit storage aside), or None when there are none."""
    inside = {id(p) for _, layer in layers for p in layer.parameters()}
    values: dict[torch.dtype, int] = {}
    for parameter in model.parameters():
        if parameter.is_floating_point() and id(parameter) not in inside and not _is_packed_4bit(parameter):
            values[parameter.dtype] = values.get(parameter.dtype, 0) + parameter.numel()
    return max(values, key=values.__getitem__) if values else None


def unload(model: nn.Module) -> nn.Module:
    """Put the original layers back and drop the adapters (merged layers are unmerged first).

    For a layer built from an ``nn.Linear`` the original module object comes back. A quantized
    layer built from a bitsandbytes ``Linear4bit``/``Linear8bitLt`` gives back that module while
    it still holds the layer's weight (see ``QuantizedLinear.bnb_module``: not after a merge, which
    requantizes); otherwise its ``QuantizedLinear`` base. Layers stacked for serving
    (``MultiLoRALinear``, from ``stack_adapters``) give back their base layer too, with all their
    adapters dropped, and modules to save their original module (its trained copy is dropped).
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
    for _, layer in layers:  # every refusal before the first change
        if isinstance(layer, LoRALinear) and layer.merged:
            layer._check_unmergeable()
            layer._check_base_writable("unload()")

    def build(layer: Any) -> nn.Module:
        if isinstance(layer, LoRALinear) and layer.merged:
            layer.unmerge()
        base = layer.base_layer
        original = base.bnb_module if isinstance(base, QuantizedLinear) else None
        return base if original is None else original

    merged = [layer for _, layer in layers if isinstance(layer, LoRALinear) and layer.merged]
    with _one_requantize_warning(merged, "unload()", UNMERGE_REQUANTIZE_CONSEQUENCE):
        _replace_layers(model, layers, build, "unload()")
    _replace_layers(model, saved, lambda module: module.original, "unload()")
    return model


# ---- counting ----------------------------------------------------------------------------------
def _is_packed_4bit(parameter: Tensor) -> bool:
    """A bitsandbytes ``Params4bit``: packed 4-bit codes, whatever its storage dtype (by class
    name, so that bitsandbytes need not be imported)."""
    return type(parameter).__name__ == "Params4bit"


def _value_count(module: nn.Module, name: str, parameter: Tensor) -> int:
    """How many weight values ``parameter`` stands for (packed storage counts what it encodes)."""
    if name == "weight" and isinstance(module, QuantizedLinear):
        return module.out_features * module.in_features
    if _is_packed_4bit(parameter):
        # two 4-bit values per byte of storage, as Hugging Face PEFT counts them
        return parameter.numel() * 2 * parameter.element_size()
    return parameter.numel()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameter values in ``model``.

    Shared parameters count once. A packed 4-bit weight counts the values it encodes, so the
    numbers equal Hugging Face PEFT's ``get_nb_trainable_parameters()`` for the same model; a
    ``QuantizedLinear`` counts ``out_features * in_features`` for its weight, stored as a parameter
    or as buffers.
    """
    _check_model(model)
    trainable = total = 0
    seen: set[int] = set()
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            count = _value_count(module, name, parameter)
            total += count
            if parameter.requires_grad:
                trainable += count
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: N || all params: M || trainable%: P`` (Hugging Face PEFT's line)."""
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")


# ---- adapter state dict ----------------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter entries of ``model.state_dict()``: ``"<path>.lora_A"``, ``"<path>.lora_B"``,
    and ``"<path>.magnitude"`` for DoRA; each layer once (under its first name), detached; and
    the state of each module to save's trained copy (``"<path>.trained.weight"``, ...). Paths
    are those of the model inside ``torch.compile``'s and data-parallel wrappers
    (:func:`unwrapped`). A model without adapters gives an empty dict; a model whose adapters are
    stacked for serving raises ``ValueError`` (they are not trainable layers: ``unload`` first)."""
    model = unwrapped(model)
    _refuse_stacks_only(model, "adapter_state_dict()")
    state: dict[str, Tensor] = {}
    for name, layer in iter_adapter_layers(model):
        prefix = f"{name}." if name else ""
        for parameter_name in layer.adapter_parameter_names:
            state[prefix + parameter_name] = getattr(layer, parameter_name).detach()
    for name, saved in iter_modules_to_save(model):
        for key, tensor in saved.trained.state_dict(prefix=f"{name}.trained.").items():
            state[key] = tensor
    return state


def load_adapter_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True
) -> nn.Module:
    """Copy adapter tensors from ``state_dict`` (keys as :func:`adapter_state_dict` gives them).

    Everything is checked before anything is copied: with ``strict``, missing and unexpected keys
    raise; without it, a non-empty ``state_dict`` of which no key fits raises (it would load
    nothing). A shape that does not fit, a tensor of another kind than the model's (floating where
    it holds floats; a module to save may hold integer buffers), a non-tensor value, a meta or
    sparse value, a merged target layer, or meta or sharded tensors in the model always raise. On
    error the model is unchanged. Values are copied as they are, NaN included, as
    ``nn.Module.load_state_dict`` does. Keys name the model inside ``torch.compile``'s and
    data-parallel wrappers (:func:`unwrapped`). Returns ``model``.
    """
    wrapper, model = model, unwrapped(model)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of name -> Tensor, got {type(state_dict).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict: expected a bool, got {strict!r}")
    _refuse_stacks_only(model, "load_adapter_state_dict()")
    expected = adapter_state_dict(model)
    if not expected:
        raise ValueError("load_adapter_state_dict(): model has no adapter layers; inject_adapters() first")
    if state_dict and not set(state_dict) & set(expected):
        # saved from a wrapped model before the tools saw through wrappers: every key under
        # "module." (DDP, DataParallel) or "_orig_mod." (torch.compile)
        for prefix in _WRAPPER_PREFIXES:
            if all(isinstance(key, str) and key.startswith(prefix) for key in state_dict):
                stripped = {key[len(prefix):]: value for key, value in state_dict.items()}
                return load_adapter_state_dict(wrapper, stripped, strict=strict)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if strict and (missing or unexpected):
        raise ValueError(
            f"state_dict: keys do not fit the model's adapters; missing: {missing}, unexpected: {unexpected}"
        )
    if state_dict and len(unexpected) == len(state_dict):
        hint = (
            "; keys in Hugging Face PEFT's file layout (base_model.model.<path>.lora_A.weight) are read by "
            "load_adapter() from a directory"
            if any(str(key).startswith("base_model.model.") for key in unexpected)
            else ""
        )
        raise ValueError(
            f"state_dict: none of its keys fits the model's adapters, so nothing would load (strict=False); "
            f"its keys: {unexpected[:5]}, the model's: {sorted(expected)[:5]}{hint}"
        )
    for key in sorted(set(expected) & set(state_dict)):
        value = state_dict[key]
        if not isinstance(value, Tensor):
            raise TypeError(f"state_dict[{key!r}]: expected a Tensor, got {type(value).__name__}")
        if value.is_meta or value.layout != torch.strided:
            kind = "on the meta device (no values)" if value.is_meta else f"of layout {value.layout}"
            raise ValueError(f"state_dict[{key!r}]: expected a dense tensor with values, got one {kind}")
        if value.is_floating_point() != expected[key].is_floating_point():
            kind = "a floating tensor" if expected[key].is_floating_point() else f"a {expected[key].dtype} tensor"
            raise ValueError(f"state_dict[{key!r}]: expected {kind}, got dtype {value.dtype}")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"state_dict[{key!r}]: shape {tuple(value.shape)} does not fit the model's "
                f"{tuple(expected[key].shape)}"
            )
    _refuse_sharded(expected.values(), "load_adapter_state_dict()")
    merged = [name for name, layer in iter_adapter_layers(model) if layer.merged]
    if merged:
        raise ValueError(f"load_adapter_state_dict(): unmerge these layers first: {merged}")
    meta = sorted(key for key in set(expected) & set(state_dict) if expected[key].is_meta)
    if meta:
        raise ValueError(
            f"load_adapter_state_dict(): {meta[:5]} are on the meta device, which holds no values, so "
            "the state would be dropped; materialise the model first (to_empty(), then load its weights)"
        )
    with torch.no_grad():
        for key in sorted(set(expected) & set(state_dict)):
            expected[key].copy_(state_dict[key])
    return wrapper


# ---- k-bit training --------------------------------------------------------------------------
def _input_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            return getter()
        except NotImplementedError:  # transformers models without token embeddings (ResNet, PatchTST)
            pass
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module
    return None


def _require_grad_hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
    return output.requires_grad_(True)


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """Get a (quantized) model ready for adapter training, as Hugging Face PEFT's
    ``prepare_model_for_kbit_training`` does; returns ``model``.

    - freezes every parameter (the adapters injected afterwards are created trainable). On a
      model that has adapter layers already, ``requires_grad`` is left as it is: ``inject_adapters``
      froze everything but the adapter tensors and the biases its ``bias`` names;
    - casts every float16/bfloat16 parameter to float32, except bitsandbytes' packed 4-bit
      storage (``Params4bit``, which can be bf16 with ``quant_storage``) and the adapter tensors of
      adapter layers already in the model (left as they are). Half-precision parameters elsewhere
      would meet float32 activations (the norms' outputs, the adapters' updates) and fail or lose
      precision. Called before ``inject_adapters``, this makes a float32 copy of every dense
      layer, including the ones that ``method="qlora"``/``"qdora"`` quantize afterwards; called
      after, those layers are quantized already and only the rest is cast (the bias of a
      bitsandbytes layer that a QLoRA layer wraps is cast with it, so ``unload`` still gives that
      layer back);
    - makes the output of the input embeddings require grad (a forward hook), so that activation
      checkpointed blocks, whose inputs would otherwise not require grad, still backpropagate into
      the adapters inside them. Without an embedding layer, nothing is hooked.
    - with ``gradient_checkpointing=True``, calls the model's ``gradient_checkpointing_enable()``
      (``activation_checkpointing_enable()``, its name since transformers 5, where it has it)
      (Hugging Face models have it; for other models it raises ``ValueError`` before anything is
      changed: wrap blocks with ``torch.utils.checkpoint.checkpoint`` yourself).
    """
    _check_model(model)
    if not isinstance(gradient_checkpointing, bool):
        raise TypeError(f"gradient_checkpointing: expected a bool, got {gradient_checkpointing!r}")
    # transformers 5 renamed it activation_checkpointing_enable (the old name warns FutureWarning
    # and calls it; the new one still calls a subclass's override of the old one)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if not callable(enable):
        enable = getattr(model, "gradient_checkpointing_enable", None)
    if gradient_checkpointing and not callable(enable):
        raise ValueError(
            f"gradient_checkpointing: {type(model).__name__} has no gradient_checkpointing_enable() "
            "(nor activation_checkpointing_enable()); wrap its blocks with "
            "torch.utils.checkpoint.checkpoint instead"
        )
    embeddings = _input_embeddings(model)  # before any change: a getter may raise
    adapter_tensors = {id(p) for _, layer in iter_adapter_layers(model) for p in layer.adapter_parameters()}
    if not adapter_tensors:
        model.requires_grad_(False)
    # the bitsandbytes modules that injected layers wrap (and unload gives back) are outside the
    # module tree: their biases get the cast of the layer's shared bias, which keeps them linked
    wrapped = [
        (layer, module) for layer in model.modules()
        if isinstance(layer, QuantizedLinear) and (module := layer.bnb_module) is not None
    ]
    for parameter in model.parameters():
        if (
            parameter.dtype in (torch.float16, torch.bfloat16)
            and not _is_packed_4bit(parameter)
            and id(parameter) not in adapter_tensors
        ):
            parameter.data = parameter.data.float()
    for layer, module in wrapped:
        if layer.bias is not None and module.bias is not None and module.bias.dtype != layer.bias.dtype:
            module.bias.data = layer.bias.data
    if embeddings is not None and not getattr(embeddings, "_peft_layers_grad_hook", False):
        embeddings.register_forward_hook(_require_grad_hook)
        setattr(embeddings, "_peft_layers_grad_hook", True)
    if gradient_checkpointing:
        cast(Callable[[], Any], enable)()
    return model
