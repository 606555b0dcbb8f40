"""The adapter methods, their layer classes, and which linear layers each one wraps; the option
values of ``inject_adapters`` (``METHODS``, ``BIAS_MODES``, ``ALL_LINEAR``, ``TargetSpec``) and the
first check of every model tool (``_check_model``), which the other modules of the package build on."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

from torch import nn

from ..adapter import is_conv1d, is_transformers_subclass
from ..dora import DoRALinear
from ..lora import (
    LoRALinear,
    LoRAPlusLinear,
    _argument_hint,
    _layer_arguments,
    is_bitsandbytes_module,
)
from ..qlora import QDoRALinear, QLoRALinear
from ..quant import QuantizedLinear


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


def _check_model(model: Any) -> None:
    """Raise ``TypeError`` unless ``model`` is an ``nn.Module`` (the first check of every tool)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")


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
#: the methods whose layers hold a quantized base (a ``QuantizedLinear``)
QUANTIZED_BASE_METHODS = tuple(FLOAT_METHOD)


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
    if method in QUANTIZED_BASE_METHODS:
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
