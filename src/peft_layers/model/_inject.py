"""``inject_adapters`` (and ``inject_lora``): choose the targets and the modules to save, check them
(nested, shared and tied modules, modules kept in float32), build every layer, then install them and
freeze the rest."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from .._errors import errors_restated
from .._warnings import warn as _warn
from ..adapter import is_conv1d
from ..lora import (
    LoRALinear,
    _layer_arguments,
    is_bitsandbytes_module,
    ranks_above_features_allowed,
)
from ..modules_to_save import ModuleToSave
from ..quant.linear import COMPUTE_DTYPES
from ._methods import (
    ALL_LINEAR,
    BIAS_MODES,
    FLOAT_METHOD,
    QUANTIZED_METHOD,
    TargetSpec,
    _LoadedQuantized,
    _accepts,
    _check_layer_kwargs,
    _check_model,
    _layer_method,
    is_quantized_linear,
    method_class,
)
from ._state import _prevailing_float_dtype
from ._tree import (
    _AllLinear,
    _PatternKeys,
    _check_pattern,
    _describe,
    _enclosing_adapter,
    _inside_adapter,
    _module_names,
    _nearest_names,
    _part_matches,
    _progress,
    _set_module,
    _spec_parts,
    refuse_foreign_wrapping,
    _stack_class,
    _suffix_matches,
    _undo_on_error,
    iter_adapter_layers,
    iter_modules_to_save,
)


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
            ``compute_dtype`` ("qlora", "qdora"). Without ``compute_dtype``, a bitsandbytes layer
            that implies none (no compute dtype of its own and no bias, as a bias-less
            ``Linear8bitLt``) computes in the dtype of most of the model's float parameters.

    A module reachable under several names is wrapped once, and that one adapter layer is put
    under every name. Each new layer takes the training mode of the module it replaces (in an
    ``eval()`` model its dropout is off). Raises ``ValueError`` if a target matches nothing (the
    message lists the linear layers, nearest first), if a match already is an adapter layer or
    lies inside one; ``TypeError`` if a match is not a linear layer the method can wrap or a layer
    argument is not one the method takes; and the layer's own error, prefixed with the module's
    name, for a value it rejects; ``ValueError`` for a model with lazy modules not yet run
    (``nn.LazyLinear``: run a forward first), a model wrapped in ``DistributedDataParallel``
    (inject first, then wrap: DDP would not average the new parameters' gradients) or holding
    Hugging Face PEFT's modules. Nothing is changed when an error is raised (no flag, no weight,
    not even a PiSSA residual).
    """
    _check_model(model)
    refuse_foreign_wrapping(model, "inject_adapters()")
    if isinstance(modules_to_save, Iterable) and not isinstance(modules_to_save, (str, re.Pattern)):
        # read once (a generator is asked twice under "all-linear"); [] saves none, as in Hugging Face PEFT
        modules_to_save = list(modules_to_save) or None
    cls = method_class(method)
    _check_layer_kwargs(method, layer_kwargs)
    if bias not in BIAS_MODES:
        hint = "; Hugging Face PEFT's bias='lora_only' is bias='adapter_only' here" if bias == "lora_only" else ""
        raise ValueError(f"bias: expected one of {BIAS_MODES}, got {bias!r}{hint}")
    rank_pattern = _check_pattern("rank_pattern", rank_pattern, int)
    alpha_pattern = _check_pattern("alpha_pattern", alpha_pattern, float)
    _refuse_lazy(model)
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
                way_out = ""
                if method in FLOAT_METHOD and is_conv1d(module):
                    way_out = (
                        f": give it {FLOAT_METHOD[method]!r}, or load the model in 4 or 8 bits with "
                        f"transformers, whose quantized layers {method!r} wraps"
                    )
                elif method in QUANTIZED_METHOD and _accepts(module, QUANTIZED_METHOD[method]):
                    way_out = f": give it {QUANTIZED_METHOD[method]!r}, which wraps quantized layers"
                raise TypeError(
                    f"targets: {_describe(part)} matches {name!r}, {article} {kind}; "
                    f"method {method!r} wraps {allowed} only{way_out}"
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
    rank_keys, alpha_keys = _PatternKeys(rank_pattern), _PatternKeys(alpha_pattern)
    for argument, keys in (("rank_pattern", rank_keys), ("alpha_pattern", alpha_keys)):
        for key in keys.unmatched(target_names)[:1]:
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
    # a bitsandbytes layer with neither a compute dtype nor a bias tells nothing of the dtype the
    # model was loaded in (every Linear8bitLt of a bias-less model such as Llama): it takes the
    # model's, as its biased neighbours do through their bias (see QuantizedLinear.from_bnb)
    loaded_in = None
    if "compute_dtype" not in layer_kwargs and any(map(_names_no_compute_dtype, wrapped)):
        loaded_in = _prevailing_float_dtype(model)
    with _undo_on_error(model, [*wrapped, *saved], values=pissa):
        # every new layer is built before the first is installed
        replacements: list[tuple[list[str], LoRALinear]] = []
        for module_id in _progress(list(chosen), f"inject_adapters({method})"):
            names = all_names[module_id]
            first = names[0]
            kwargs = dict(layer_kwargs)
            # a shared module's names are tried in order: a key may name any of them
            rank_key = next(filter(None, map(rank_keys, names)), None)
            if rank_key is not None:
                kwargs["rank"] = rank_pattern[rank_key]
            pattern = next(filter(None, map(alpha_keys, names)), None)
            if pattern is not None:
                kwargs["alpha"] = alpha_pattern[pattern]
            if loaded_in in COMPUTE_DTYPES and _names_no_compute_dtype(modules[first]):
                kwargs["compute_dtype"] = loaded_in
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
        copies: list[tuple[list[str], nn.Module]] = [
            (all_names[id(m)], _build_saved(all_names[id(m)][0], m)) for m in saved
        ]
        for names, new in [*replacements, *copies]:
            for name in names:
                _set_module(model, name, new)
        _freeze_all_but_adapters(model, bias)
    return model


def _names_no_compute_dtype(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes layer that implies no compute dtype: it names none
    (every ``Linear8bitLt``; a ``Linear4bit`` built by hand) and has no bias to take it from."""
    return is_bitsandbytes_module(module) and getattr(module, "compute_dtype", None) is None and module.bias is None


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


def weight_read_directly(modules: Mapping[str, nn.Module], name: str) -> str | None:
    """Why the module ``name`` has its weight read by its parent without being called, so that
    an adapter there would silently do nothing, or None.

    - the ``out_proj`` of an ``nn.MultiheadAttention``, always;
    - ``linear1``/``linear2`` of an ``nn.TransformerEncoderLayer`` that can take torch's fast
      path: in eval mode it hands their weights to ``torch._transformer_encoder_layer_fwd``
      (``nn.TransformerEncoder`` first nests the batch), unless the fast path is switched off
      with ``torch.backends.mha.set_fastpath_enabled(False)``. Only layers that meet the path's
      fixed conditions are refused: ``batch_first=True``, a relu or gelu activation, an even
      number of heads, an in-projection bias and one embedding size, equal norm epsilons.
    """
    parent_name, _, child = name.rpartition(".")
    parent = modules.get(parent_name)
    if child == "out_proj" and isinstance(parent, nn.MultiheadAttention):
        return (
            "the out_proj of an nn.MultiheadAttention, which reads its weight directly and never "
            "calls it: an adapter there would do nothing"
        )
    if child in ("linear1", "linear2") and isinstance(parent, nn.TransformerEncoderLayer) and _fast_path_possible(parent):
        return (
            f"the {child} of an nn.TransformerEncoderLayer that torch runs through its fast path in "
            "eval mode (batch_first=True, relu or gelu, an even number of heads), which reads its "
            "weight directly: an adapter there would do nothing in eval unless the fast path is "
            "switched off (torch.backends.mha.set_fastpath_enabled(False) before adding adapters, "
            "kept off while they are unmerged)"
        )
    return None


def _fast_path_possible(layer: nn.TransformerEncoderLayer) -> bool:
    """Whether ``layer`` meets the fixed conditions of torch's fast path (its forward checks the
    rest, the mode, autocast and the input, on every call)."""
    fast_path_enabled = getattr(torch.backends.mha, "get_fastpath_enabled", lambda: True)
    attention = layer.self_attn
    return bool(
        fast_path_enabled()
        and attention.batch_first
        and attention.in_proj_bias is not None
        and attention._qkv_same_embed_dim
        and getattr(layer, "activation_relu_or_gelu", True)
        and getattr(layer.norm1, "eps", None) == getattr(layer.norm2, "eps", None)
        and attention.num_heads % 2 == 0
    )


def _check_called(
    model: nn.Module, modules: dict[str, nn.Module], name: str, method: str, kept: list[tuple[str, list[str]]]
) -> None:
    """Refuse a linear layer that its model never calls as a module, or whose weight dtype the
    model reads (``kept``: :func:`_keep_in_fp32_lists`), where an adapter would silently do
    nothing or break the forward."""
    reason = weight_read_directly(modules, name)
    if reason is not None:
        raise TypeError(f"targets: {name!r} is {reason}; exclude it")
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
    with errors_restated(lambda error: f"inject_adapters(): module {name!r}: {error}", (TypeError, ValueError),
                         keep_cause=False):
        layer = cls.from_linear(module, **kwargs)
    # a new module starts in training mode: in an eval() model its dropout would run
    layer.train(module.training)
    return layer


def _build_saved(name: str, module: nn.Module) -> ModuleToSave:
    """``ModuleToSave(module)``; an error of its copy raises the same error type, with
    ``modules_to_save`` and the module's name in front."""
    with errors_restated(lambda error: f"inject_adapters(): modules_to_save: module {name!r}: {error}",
                         (TypeError, ValueError, RuntimeError), keep_cause=True):
        return ModuleToSave(module)


def inject_lora(model: nn.Module, targets: TargetSpec, **kwargs: Any) -> nn.Module:
    """:func:`inject_adapters` with ``method="lora"``: the plain LoRA layers of the model."""
    if "method" in kwargs:
        raise TypeError(
            f"method: inject_lora() always injects 'lora', got method={kwargs['method']!r}; call "
            "inject_adapters(model, targets, method=...) for another method"
        )
    return inject_adapters(model, targets, method="lora", **kwargs)


def _refuse_lazy(model: nn.Module) -> None:
    """Raise ``ValueError`` if ``model`` holds uninitialized parameters (lazy modules, such as
    ``nn.LazyLinear`` before its first forward): injection freezes every parameter of the model,
    which torch refuses for those, and a lazy layer has no size to adapt yet."""
    lazy = {
        name: type(module).__name__ for name, module in model.named_modules()
        if any(is_lazy(parameter) for parameter in module.parameters(recurse=False))
    }
    if lazy:
        listed = ", ".join(f"{name!r} ({kind})" for name, kind in list(lazy.items())[:5])
        raise ValueError(
            f"model: {len(lazy)} module(s) hold uninitialized parameters (lazy modules): {listed}"
            f"{' ...' if len(lazy) > 5 else ''}; run a forward with a dummy batch first, which gives "
            "them their sizes, then inject adapters"
        )


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
