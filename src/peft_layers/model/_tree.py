"""Walking the module tree: name matching, "all-linear", swapping modules, undoing a failed change."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from tqdm.auto import tqdm

from .._warnings import warn as _warn
from ..adapter import is_sharded, is_transformers_subclass
from ..lora import LoRALinear
from ..modules_to_save import ModuleToSave
from ._methods import (
    ALL_LINEAR,
    QUANTIZED_BASE_METHODS,
    QUANTIZED_METHOD,
    TargetSpec,
    _CLASSIFIER_HEADS,
    _accepts,
    _check_model,
    _layer_method,
    is_quantized_linear,
)


# ---- name matching ---------------------------------------------------------------------------
def _suffix_matches(suffix: str, name: str) -> bool:
    """``suffix`` equals ``name`` or its last dotted components ("q_proj" ~ "l.0.q_proj")."""
    return name == suffix or name.endswith("." + suffix)


def _spec_parts(spec: TargetSpec, argument: str, *, allow_empty: bool = False) -> list[Any]:
    """Split a spec into parts that are each checked for matching something."""
    allowed = "a name suffix, a list of them, a compiled regex or a callable (name, module) -> bool"
    if isinstance(spec, nn.Module):  # callable, but not the predicate a callable stands for
        raise TypeError(
            f"{argument}: expected {allowed}, got a module ({type(spec).__name__}); pass its name"
        )
    if isinstance(spec, (bytes, bytearray)):  # iterable, but of ints
        raise TypeError(f"{argument}: expected {allowed}, got {spec!r} ({type(spec).__name__}); decode it to str")
    if callable(spec):
        _check_predicate(spec, argument)
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
    raise TypeError(f"{argument}: expected {allowed}, got {type(spec).__name__}")


def _check_predicate(predicate: Callable[..., Any], argument: str) -> None:
    """Refuse a callable that cannot be called as ``predicate(name, module)``, before it is
    called (its own TypeError would name neither the argument nor what it must take)."""
    try:
        signature = inspect.signature(predicate)
    except (TypeError, ValueError):  # no signature to read (some builtins): calling it will tell
        return
    try:
        signature.bind("name", None)
    except TypeError:
        raise TypeError(
            f"{argument}: a callable must take two arguments (name, module) and return a bool; "
            f"{_describe(predicate)} takes {signature}"
        ) from None


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


def _anchored_path(key: str) -> str | None:
    """The path ``p`` if ``key`` is ``"^" + re.escape(p)`` (the keys that ``save_adapter`` and
    ``load_adapter`` write, which match ``p`` only), else None."""
    if not key.startswith("^"):
        return None
    path = re.sub(r"\\(.)", r"\1", key[1:], flags=re.DOTALL)
    return path if re.escape(path) == key[1:] else None


class _PatternKeys:
    """:func:`pattern_key` of one ``patterns`` mapping, asked for many names: every key compiled
    once, and the anchored keys (:func:`_anchored_path`) looked up by name rather than tried one
    by one, so that a file with a key per layer loads in linear time."""

    def __init__(self, patterns: Mapping[str, Any]) -> None:
        self.exact: dict[str, tuple[int, str]] = {}
        self.scanned: list[tuple[int, str, re.Pattern[str]]] = []
        for order, key in enumerate(patterns):
            path = _anchored_path(key)
            if path is not None:
                self.exact.setdefault(path, (order, key))
            else:
                self.scanned.append((order, key, re.compile(rf"(.*\.)?({key})$")))

    def _exact(self, name: str) -> tuple[int, str] | None:
        # "$" also matches before a final newline: "^p" matches "p\n" too
        hits = [self.exact[n] for n in (name, name[:-1] if name.endswith("\n") else None) if n in self.exact]
        return min(hits) if hits else None

    def __call__(self, name: str) -> str | None:
        exact = self._exact(name)
        for order, key, compiled in self.scanned:
            if exact is not None and order > exact[0]:
                break
            if compiled.match(name):
                return key
        return exact[1] if exact is not None else None

    def unmatched(self, names: Iterable[str]) -> list[str]:
        """The keys that match none of ``names`` (in order), an empty key always among them
        (``pattern_key`` gives it back as ``""``, which tells no match)."""
        names = list(names)
        matched = {
            self.exact[n][1] for name in names
            for n in (name, name[:-1] if name.endswith("\n") else None) if n in self.exact
        }
        matched.update(key for _, key, compiled in self.scanned if any(compiled.match(n) for n in names))
        ordered = sorted([*self.exact.values(), *((o, k) for o, k, _ in self.scanned)])
        return [key for _, key in ordered if not key or key not in matched]


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
    from ..serving import MultiLoRALinear

    return MultiLoRALinear


def _enclosing_adapter(model: nn.Module, name: str) -> nn.Module | None:
    """The adapter layer, stack of served adapters or module to save that ``name`` lies inside
    (as its ``base_layer``, ``original``/``trained`` or deeper), or None."""
    holders = (LoRALinear, _stack_class(), ModuleToSave)
    if name and isinstance(model, holders):  # a model that is itself one holds every other name
        return model
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
    or ``classifier`` head (both asked of the model inside ``torch.compile``'s and data-parallel
    wrappers, :func:`unwrapped`), the modules to save, the ``out_proj`` of an ``nn.MultiheadAttention``
    (which the attention never calls), and what lies inside these or inside an adapter layer.
    With ``"qlora"``/``"qdora"``, a float layer the model keeps unquantized (transformers'
    ``_keep_in_fp32_modules``, T5's ``wo``) gets ``"lora"``/``"dora"``, as Hugging Face PEFT
    gives it its float LoRA layer. With a float method, quantized layers that the method cannot
    wrap are refused (:meth:`refuse_quantized`) rather than left out silently."""

    def __init__(
        self, model: nn.Module, method: str, modules_to_save: TargetSpec | None, scope: Callable[[str], bool]
    ) -> None:
        self.model, self.method, self.scope = model, method, scope
        # the heads are the model's, inside torch.compile's and data-parallel wrappers
        inner = unwrapped(model)
        left_out = [getattr(inner, name, None) for name in _CLASSIFIER_HEADS]
        if is_transformers_subclass(type(inner), "PreTrainedModel"):  # as Hugging Face PEFT: only these
            left_out.append(cast(Any, inner).get_output_embeddings())
        left_out += [m.out_proj for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
        saved = _spec_parts(modules_to_save, "modules_to_save", allow_empty=True) if modules_to_save is not None else []
        left_out += [m for n, m in model.named_modules() if n and any(_part_matches(p, n, m) for p in saved)]
        self.left_out = {id(sub) for module in left_out if isinstance(module, nn.Module) for sub in module.modules()}

    def refuse_quantized(self, exclude_parts: list[Any]) -> None:
        """Raise ``ValueError`` if a float method would leave out quantized layers that are not
        excluded: Hugging Face PEFT adapts them, so leaving them out silently would differ."""
        if self.method in QUANTIZED_BASE_METHODS:
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
    comes out), the ``requires_grad`` flag of every parameter of ``model`` that the body changed,
    and for each of
    ``modules`` and its submodules the parameter and buffer objects, their storage and plain
    attributes (``training``, a quantized layer's ``version``, ...). With ``values`` also the
    contents of those tensors, which PiSSA rewrites in place; that copy costs memory, so only then.
    Uninitialized tensors (of lazy modules, ``nn.LazyLinear``) are left alone: torch refuses every
    operation on them, so the body cannot have changed them, and touching them would raise in
    place of the body's error.
    """
    modules = list(modules)
    all_names = _module_names(model)
    placed = [(name, module) for module in modules for name in all_names.get(id(module), []) if name]
    grad_flags = [(parameter, parameter.requires_grad) for parameter in model.parameters() if not is_lazy(parameter)]
    states = []  # (submodule, its parameter dict, buffer dict, plain attributes)
    tensors = []  # (tensor, its storage, a copy of its values or None)
    for module in modules:
        for sub in module.modules():
            plain = {k: v for k, v in vars(sub).items() if not isinstance(v, dict)}
            states.append((sub, dict(sub._parameters), dict(sub._buffers), plain))
            for tensor in [*sub._parameters.values(), *sub._buffers.values()]:
                if tensor is not None and not is_lazy(tensor):
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
            if parameter.requires_grad != flag:
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


#: what the wrappers :func:`unwrapped` sees through put before every name
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside the wrappers that rename every module: ``torch.compile``'s
    ``OptimizedModule`` (names under ``_orig_mod.``), ``DistributedDataParallel`` and
    ``DataParallel`` (under ``module.``). Adapter files and adapter state dicts use the model's own
    names, so that a compiled or data-parallel model saves files a plain one loads, both ways."""
    _check_model(model)
    *_, inner = _wrapper_chain(model)
    return inner


def _wrapper_chain(model: nn.Module) -> Iterator[nn.Module]:
    """``model``, then each module inside the wrappers :func:`unwrapped` sees through, in turn."""
    # torch._dynamo is imported by torch.compile: a model it wrapped finds it in sys.modules
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    compiled = getattr(eval_frame, "OptimizedModule", ())
    while True:
        yield model
        if compiled and isinstance(model, compiled):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return


def refuse_foreign_wrapping(model: nn.Module, caller: str) -> None:
    """Refuse to add adapters to a model where they would not work as documented:

    - inside ``DistributedDataParallel`` (also under ``torch.compile``): its gradient reducer
      covers only the parameters present when it was built, so adapters added later would train
      apart on each rank, silently;
    - holding Hugging Face PEFT's modules (a ``PeftModel``): its adapter layers are not
      ``nn.Linear``, and peft_layers does not nest adapters inside another library's.
    """
    for wrapper in _wrapper_chain(model):
        if isinstance(wrapper, nn.parallel.DistributedDataParallel):
            raise ValueError(
                f"{caller}: the model is wrapped in DistributedDataParallel, whose gradient reducer "
                "covers only the parameters present when it was built, so adapters added now would "
                "train apart on each rank; add them to the model first, then wrap it in DDP"
            )
    for name, module in wrapper.named_modules():  # the model inside the wrappers
        if type(module).__module__.split(".")[0] == "peft":
            raise ValueError(
                f"{caller}: the model holds Hugging Face PEFT's modules ({name or 'the model'}: "
                f"{type(module).__module__}.{type(module).__qualname__}); peft_layers does not add "
                "adapters inside another library's. Take the base model out of the PeftModel "
                "first: merge_and_unload() keeps its adapters merged, unload() drops them"
            )


def iter_adapter_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Each adapter layer of ``model`` once, with its first dotted name."""
    _check_model(model)
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def iter_modules_to_save(model: nn.Module) -> Iterator[tuple[str, ModuleToSave]]:
    """Each :class:`ModuleToSave` of ``model`` once, with its first dotted name."""
    _check_model(model)
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
