"""Counting trainable parameters (and telling bitsandbytes' packed 4-bit storage, ``_is_packed_4bit``,
which ``_merge`` and ``_kbit`` also ask, and a model's prevailing float dtype, which ``_merge`` and
``_inject`` ask); the adapter tensors of a model as a state dict."""

from __future__ import annotations

from collections.abc import Mapping, Set

import torch
from torch import Tensor, nn

from ..quant import QuantizedLinear
from ._methods import _check_model
from ._tree import (
    _WRAPPER_PREFIXES,
    _refuse_sharded,
    _refuse_stacks_only,
    iter_adapter_layers,
    iter_modules_to_save,
    unwrapped,
)


# ---- counting ----------------------------------------------------------------------------------
def _is_packed_4bit(parameter: Tensor) -> bool:
    """A bitsandbytes ``Params4bit``: packed 4-bit codes, whatever its storage dtype (by class
    name, so that bitsandbytes need not be imported)."""
    return type(parameter).__name__ == "Params4bit"


def _prevailing_float_dtype(model: nn.Module, skip: Set[int] = frozenset()) -> torch.dtype | None:
    """The dtype that holds most float values among ``model``'s parameters, the parameters whose
    ids are in ``skip`` and bitsandbytes' packed 4-bit storage aside; None when there are none.
    For a model transformers loaded in 4 or 8 bits it is the dtype it was loaded in (float32
    after :func:`prepare_for_kbit_training`)."""
    values: dict[torch.dtype, int] = {}
    for parameter in model.parameters():
        if parameter.is_floating_point() and id(parameter) not in skip and not _is_packed_4bit(parameter):
            values[parameter.dtype] = values.get(parameter.dtype, 0) + parameter.numel()
    return max(values, key=values.__getitem__) if values else None


def _value_count(module: nn.Module, name: str, parameter: Tensor) -> int:
    """How many weight values ``parameter`` stands for (packed storage counts what it encodes)."""
    if name == "weight" and isinstance(module, QuantizedLinear):
        values = module.out_features * module.in_features
        # 4-bit codes fill whole bytes: Hugging Face PEFT counts the pad of an odd count too
        return values if module.scheme == "int8" else values + values % 2
    if _is_packed_4bit(parameter):
        # two 4-bit values per byte of storage, as Hugging Face PEFT counts them
        return parameter.numel() * 2 * parameter.element_size()
    return parameter.numel()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameter values in ``model``.

    Shared parameters count once. A packed 4-bit weight counts the values it encodes, so the
    numbers equal Hugging Face PEFT's ``get_nb_trainable_parameters()`` for the same model; a
    ``QuantizedLinear`` counts ``out_features * in_features`` for its weight, stored as a parameter
    or as buffers (a 4-bit one rounded up to whole bytes, two values each, as Hugging Face PEFT
    counts an odd count's pad).
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
    and ``"<path>.magnitude"`` for DoRA; each layer once (under its first name), detached; the
    state of each module to save's trained copy (``"<path>.trained.weight"``, ...); and the
    biases that :func:`save_adapter`'s file holds, by its rule: where a bias of an adapter layer
    trains (``bias="adapter_only"``), those layers' (``"<path>.base_layer.bias"``); where another
    trains (``bias="all"``), every bias of the model as well. A trained bias belongs to the
    adapter, as in Hugging Face PEFT's ``get_peft_model_state_dict``. Paths
    are those of the model inside ``torch.compile``'s and data-parallel wrappers
    (:func:`unwrapped`). Every key is a key of ``model.state_dict()``, so a model that is itself
    an adapter layer or module to save gives its own keys, unprefixed (``"lora_A"``,
    ``"trained.weight"``), which :func:`load_adapter_state_dict` takes back. A model without adapters gives an empty dict; a model whose adapters are
    stacked for serving raises ``ValueError`` (they are not trainable layers: ``unload`` first)."""
    model = unwrapped(model)
    _refuse_stacks_only(model, "adapter_state_dict()")
    state: dict[str, Tensor] = {}
    for name, layer in iter_adapter_layers(model):
        prefix = f"{name}." if name else ""
        for parameter_name in layer.adapter_parameter_names:
            state[prefix + parameter_name] = getattr(layer, parameter_name).detach()
    for name, saved in iter_modules_to_save(model):
        prefix = f"{name}." if name else ""
        for key, tensor in saved.trained.state_dict(prefix=f"{prefix}trained.").items():
            state[key] = tensor
    # the biases save_adapter's file holds, by its rule (io._save._bias_mode), under the model's
    # own keys; a module to save's original is no part of the adapter
    from ..io._save import _bias_mode, _plain_named_parameters  # io imports this module

    layers = list(iter_adapter_layers(model))
    if not state:  # no adapter layers nor modules to save: no bias belongs to an adapter
        return state
    mode = _bias_mode(model, layers)
    if mode != "none":
        for name, layer in layers:
            if layer.bias is not None:
                state[f"{name}.base_layer.bias" if name else "base_layer.bias"] = layer.bias.detach()
    if mode == "all":
        for key, parameter in _plain_named_parameters(model, rename_stacks=False):
            if key == "bias" or key.endswith(".bias"):
                state.setdefault(key, parameter.detach())
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
    unexpected = sorted(set(state_dict) - set(expected), key=str)  # a non-str key may be among them
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
        if value.is_complex():  # passes as "not floating"; its cast would warn after earlier copies
            raise ValueError(f"state_dict[{key!r}]: expected a real tensor, got dtype {value.dtype}")
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
