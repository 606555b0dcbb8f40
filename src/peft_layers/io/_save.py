"""Writing an adapter file: the tensors and config of a model's adapters, saved atomically."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._warnings import warn as _warn
from ..dora import DoRALinear
from ..lora import LoRALinear
from ..modules_to_save import ModuleToSave
from ..model import (
    FLOAT_METHOD,
    QUANTIZED_METHOD,
    iter_adapter_layers,
    iter_modules_to_save,
    method_of,
    unwrapped,
)
from ..model._tree import (
    _adapter_layers_or_raise,
    _inside_adapter,
    _refuse_sharded,
    _stacked_layers,
)
from ..qlora import QLoRALinear
from ._format import (
    CONFIG_NAME,
    KEY_PREFIX,
    METADATA_KEY,
    WEIGHTS_NAME,
    _BIAS_TO_HF,
    _DORA_EPSILON,
    adapter_directory,
)



# ---- saving ------------------------------------------------------------------------------------
def _anchored(path: str) -> str:
    """A ``rank_pattern`` key that Hugging Face's ``re.match(rf"(.*\\.)?({key})$", name)`` and
    :func:`pattern_key` match to ``path`` only: ``^`` fails after a non-empty prefix."""
    return "^" + re.escape(path)


def _most_common(values: list[Any]) -> Any:
    """The most frequent value; ties go to the one seen first."""
    counts = Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _quant_info(layer: QLoRALinear) -> dict[str, Any]:
    """The quantization of a quantized layer's base (always a ``QuantizedLinear``: bitsandbytes
    layers are wrapped into one): ``scheme``, ``blocksize``, ``double_quant``, ``compute_dtype``."""
    base = layer.base_layer
    return {
        "scheme": base.scheme,
        "blocksize": base.blocksize,
        "double_quant": base.double_quant,
        "compute_dtype": _dtype_name(base.compute_dtype),
    }


def _uniform(layers: Sequence[tuple[str, LoRALinear]], what: str, value_of, shown=None) -> Any:
    """The one value of ``value_of(layer)`` over ``layers``; else ``ValueError`` listing the
    layers by ``shown(layer)`` (default: that value)."""
    values = {name: value_of(layer) for name, layer in layers}
    distinct = list(dict.fromkeys(map(repr, values.values())))
    if len(distinct) > 1:
        by_value: dict[str, list[str]] = {}
        for name, layer in layers:
            by_value.setdefault(repr(shown(layer) if shown else values[name]), []).append(name)
        raise ValueError(
            f"save_adapter(): one adapter file holds one {what} for all layers, but the model mixes "
            f"{', '.join(f'{value} at {names}' for value, names in by_value.items())}. To keep these "
            "adapters, save pl.adapter_state_dict(model) (e.g. with safetensors.torch.save_file) and "
            "restore it with pl.load_adapter_state_dict() into a model injected the same way; for "
            "Hugging Face PEFT, train one setting per model"
        )
    return next(iter(values.values()))


def _bias_mode(model: nn.Module, layers: list[tuple[str, LoRALinear]]) -> str:
    """Our bias mode, read from which biases train, the narrowest that saves every trained one: a
    bias outside the adapter layers -> "all" (even where the adapted layers have no bias), the
    adapter layers' only -> "adapter_only", none -> "none"."""
    other = [p for name, p in _plain_named_parameters(model) if name == "bias" or name.endswith(".bias")]
    if any(p.requires_grad for p in other):
        return "all"
    if any(layer.bias is not None and layer.bias.requires_grad for _, layer in layers):
        return "adapter_only"
    return "none"


def _plain_named_parameters(model: nn.Module, rename_stacks: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters of ``model`` that are not inside an adapter layer or a module to save, under
    their first names as the plain model names them: a serving stack's base parameters
    (``<p>.base_layer.bias``) under the stacked layer's own (``<p>.bias``), its adapters left out.
    With ``rename_stacks=False``, every such parameter under its ``model.state_dict()`` name."""
    # looked up by each dotted prefix of a name: a scan of every holder per parameter is quadratic
    holders = {name for name, _ in [*iter_adapter_layers(model), *iter_modules_to_save(model)]}
    if "" in holders:
        return  # the model is itself an adapter layer or a module to save: it holds every parameter
    stacks = {name: order for order, (name, _) in reversed(list(enumerate(_stacked_layers(model))))}
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        owners = [".".join(parts[:end]) for end in range(1, len(parts))]
        if any(owner in holders for owner in owners):
            continue
        if not rename_stacks:
            yield name, parameter
            continue
        # the first stack (in named_modules order) that holds the parameter
        stack = min(((stacks[o], f"{o}.") for o in owners if o in stacks), default=(0, None))[1]
        if stack is not None:
            inner = name[len(stack):]
            if not inner.startswith("base_layer."):
                continue  # the stack's adapters, served, not trained
            name = stack + inner[len("base_layer."):]
        yield name, parameter


def _plain_module_names(model: nn.Module) -> list[str]:
    """The module names a Hugging Face PEFT model built on the plain base would see: every name
    of ``model`` except those inside adapter layers."""
    return [name for name, _ in model.named_modules(remove_duplicate=False) if not _inside_adapter(model, name)]


def _target_modules(paths: list[str], plain_names: list[str]) -> list[str] | str:
    """The exact paths as a list, or, if a list would also match another module (a path that is a
    dotted suffix of another module's name), a full-match regex of exactly these paths."""
    wanted = set(paths)
    others = [n for n in plain_names if n and n not in wanted]
    # n.endswith("." + p) for some p, as a lookup of each proper dotted tail of n (linear, not n * p)
    if any(".".join(n.split(".")[i:]) in wanted for n in others for i in range(1, n.count(".") + 1)):
        return "(?:" + "|".join(re.escape(p) for p in paths) + ")"
    return sorted(paths)


def _names_peft_leaves_plain(model: nn.Module) -> list[tuple[str, list[str]]]:
    """``(first name, other names)`` of each adapter layer that ``model`` holds under several names
    where Hugging Face PEFT would adapt the first name only.

    Its ``named_modules()`` reaches a shared module once, under its first name, and replaces it
    there by setting that attribute on that parent. Another name sees the adapter only if it is the
    same attribute of the same parent object (a shared block: ``layers.0.fc`` and ``layers.1.fc``
    with ``layers.0 is layers.1``); any other name (``dec`` after ``model.dec = model.enc``) keeps
    the plain base there, while we put the adapter layer under every name."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (LoRALinear, ModuleToSave)) and name:
            names.setdefault(id(module), []).append(name)

    def slot(name: str) -> tuple[int, str]:
        parent, _, attribute = name.rpartition(".")
        return id(model.get_submodule(parent)), attribute

    shared = []
    for first, *others in names.values():
        plain = [name for name in others if slot(name) != slot(first)]
        if plain:
            shared.append((first, plain))
    return shared


def _warn_shared(model: nn.Module, caller: str, file: str) -> None:
    for first, plain in _names_peft_leaves_plain(model):
        _warn(
            f"{caller}: {[first, *plain]} name one shared module, which has the adapter under every name "
            f"here; Hugging Face PEFT adapts only the first name ({first!r}) and leaves {plain} as the "
            f"plain base, so {file} gives different outputs there in Hugging Face PEFT",
        )


def _name_or_path(model: nn.Module) -> str | None:
    """Where the model was loaded from (a transformers model's ``name_or_path``: a Hub name or a
    folder), as Hugging Face PEFT records it: ``AutoPeftModel*.from_pretrained`` builds the
    base from it. None for a model built otherwise (transformers gives ``""`` then)."""
    name = getattr(model, "name_or_path", None)
    return name if isinstance(name, str) and name else None


def _build_files(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any] | None]:
    """The tensors (Hugging Face keys), the config and our field (None when a ``LoraConfig`` says
    it all) of ``model``'s adapter."""
    layers = _adapter_layers_or_raise(model, "save_adapter()")  # checks that model is a module
    if any(name == "" for name, _ in layers):
        raise ValueError("save_adapter(): the model itself is an adapter layer; wrap it in a module first")
    # a quantized method and its float one are one adapter (Hugging Face PEFT's files say nothing
    # of the base); the layers a model keeps unquantized (T5's wo) are listed in our field
    family = _uniform(
        layers, "method (QLoRA may sit beside LoRA, QDoRA beside DoRA)",
        lambda layer: FLOAT_METHOD.get(method_of(layer), method_of(layer)), shown=method_of,
    )
    quantized = [(name, layer) for name, layer in layers if isinstance(layer, QLoRALinear)]
    method = QUANTIZED_METHOD[family] if quantized else family
    use_rslora = _uniform(layers, "use_rslora", lambda layer: layer.use_rslora)
    pissa = _uniform(layers, "init (pissa or not)", lambda layer: layer.init == "pissa")
    ours: dict[str, Any] = {}
    if method in ("dora", "qdora"):
        epsilon = _uniform(layers, "DoRA epsilon", lambda layer: layer.epsilon)
        if epsilon != _DORA_EPSILON:
            ours["epsilon"] = epsilon
    if method == "lora_plus":
        ours["lr_ratio"] = _uniform(layers, "LoRA+ lr_ratio", lambda layer: layer.lr_ratio)
    if quantized:
        ours["quant"] = _uniform(quantized, "quantization", _quant_info)
        if len(quantized) < len(layers):
            ours["float_modules"] = [name for name, layer in layers if not isinstance(layer, QLoRALinear)]

    ranks = [layer.rank for _, layer in layers]
    alphas = [layer.alpha for _, layer in layers]
    r, alpha = _most_common(ranks), _most_common(alphas)
    rank_pattern = {_anchored(name): layer.rank for name, layer in layers if layer.rank != r}
    alpha_pattern = {_anchored(name): layer.alpha for name, layer in layers if layer.alpha != alpha}
    bias = _bias_mode(model, layers)

    tensors: dict[str, Tensor] = {}
    for name, layer in layers:
        prefix = KEY_PREFIX + name
        tensors[f"{prefix}.lora_A.weight"] = layer.lora_A
        tensors[f"{prefix}.lora_B.weight"] = layer.lora_B
        if isinstance(layer, DoRALinear):
            tensors[f"{prefix}.lora_magnitude_vector"] = layer.magnitude
        if bias != "none" and layer.bias is not None:
            tensors[f"{prefix}.base_layer.bias"] = layer.bias
    if bias == "all":
        for name, parameter in _plain_named_parameters(model):
            if name == "bias" or name.endswith(".bias"):
                tensors[KEY_PREFIX + name] = parameter
    saved = list(iter_modules_to_save(model))
    for name, module in saved:  # the trained copy's state under the module's own name
        for key, tensor in module.trained.state_dict(prefix=f"{KEY_PREFIX}{name}.").items():
            tensors[key] = tensor
    saved_names = [name for name, _ in saved]
    wider = _wider_saved_matches(model, saved_names)
    if wider:
        ours["modules_to_save"] = saved_names  # exact, for our loader
        _warn(
            f"save_adapter(): Hugging Face PEFT matches modules_to_save names as suffixes of module "
            f"names, so it would also wrap {wider} and then fail to load this file, whose state of "
            "those modules is missing; load_adapter() reads it exactly",
        )
    _refuse_sharded(tensors.values(), "save_adapter()")
    _refuse_meta(tensors)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    non_finite = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(v.isfinite().all()))
    if non_finite:  # load_adapter refuses such a file: better to say so before it is written
        raise ValueError(
            f"save_adapter(): {non_finite[:5]} hold NaN or inf (training diverged?); load_adapter() refuses "
            "non-finite tensors, so the file would not load back. Nothing was written"
        )
    float32_max = torch.finfo(torch.float32).max
    too_wide = sorted(
        k for k, v in tensors.items() if v.dtype == torch.float64 and v.numel() and float(v.abs().max()) > float32_max
    )
    if too_wide:  # load_adapter refuses them too: a float32 or 16-bit model would load them as inf
        raise ValueError(
            f"save_adapter(): {too_wide[:5]} (float64) hold values beyond float32's range, which "
            "load_adapter() refuses (a float32 or half-precision layer would load them as inf), so the "
            "file would not load back. Nothing was written"
        )

    config: dict[str, Any] = {
        "alpha_pattern": alpha_pattern,
        # with no task_type, AutoPeftModel builds the base from this class and name_or_path
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        "base_model_name_or_path": _name_or_path(model),
        "bias": _BIAS_TO_HF[bias],
        "exclude_modules": None,
        # Hugging Face PEFT decides per layer by its type (it corrects a wrong value with a
        # warning): true when every adapted layer is a Conv1D, so it has nothing to correct
        "fan_in_fan_out": all(layer.fan_in_fan_out for _, layer in layers),
        "inference_mode": True,
        "init_lora_weights": "pissa" if pissa else True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": _most_common([layer.dropout for _, layer in layers]),
        "modules_to_save": [name for name, _ in saved] or None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": rank_pattern,
        "revision": None,
        "target_modules": _target_modules([name for name, _ in layers], _plain_module_names(model)),
        "task_type": None,
        "use_dora": method in ("dora", "qdora"),
        "use_rslora": use_rslora,
    }
    if method in ("lora", "dora") and not ours:
        return tensors, config, None
    version = 2 if "float_modules" in ours else 1  # the lowest that describes the file
    return tensors, config, {"version": version, "method": method, **ours}


def _refuse_meta(tensors: dict[str, Tensor]) -> None:
    """Raise ``ValueError`` naming the keys of ``tensors`` on the meta device: they hold no values
    to write."""
    meta = sorted(key for key, tensor in tensors.items() if tensor.is_meta)
    if meta:
        more = f" and {len(meta) - 5} more" if len(meta) > 5 else ""
        raise ValueError(
            f"save_adapter(): model: {meta[:5]}{more} are on the meta device, which holds no values "
            "to save; materialise the model first (to_empty(), then load its weights and train or "
            "load the adapters), then save it. Nothing was written"
        )


#: the modules inside a Hugging Face PEFT LoRA layer (0.21, adapter "default"), and a DoRA layer's
_PEFT_LORA_MODULES = (
    "base_layer", "lora_dropout", "lora_dropout.default", "lora_A", "lora_A.default", "lora_B",
    "lora_B.default", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
)
_PEFT_DORA_MODULES = ("lora_magnitude_vector.default",)


def _wider_saved_matches(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """Name of a module to save -> the other modules whose names end with it (Hugging Face PEFT
    would take them as modules to save too), named as the plain model names them (the modules
    inside a module to save included), and as Hugging Face PEFT names the modules it builds inside
    its LoRA layers before it looks (``out`` ends ``fc.lora_dropout``, ``layer`` ends
    ``fc.base_layer``)."""
    inner = [
        f"{name}.{sub}" for name, saved in iter_modules_to_save(model)
        for sub, _ in saved.original.named_modules() if sub
    ]
    peft_inner = [
        f"{name}.{sub}" for name, layer in iter_adapter_layers(model)
        for sub in (*_PEFT_LORA_MODULES, *(_PEFT_DORA_MODULES if isinstance(layer, DoRALinear) else ()))
    ]
    plain = [n for n in [*_plain_module_names(model), *inner, *peft_inner] if n and n not in names]
    wider = {name: [n for n in plain if n.endswith(name)] for name in names}
    return {name: others for name, others in wider.items() if others}


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are durable enough
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomically(directory: Path, files: dict[str, bytes]) -> None:
    """Replace ``directory/<name>`` by ``files[name]`` for every name, all or nothing.

    Each file goes to a temporary file in ``directory`` and is fsynced; then the temporary files
    are renamed over the targets (``os.replace``, atomic per file) and the directory is fsynced.
    An existing target is first hard-linked (or copied) aside, so that if a later rename fails the
    earlier ones are undone. A crash between two renames (power loss) can leave one new and one
    old file; ``load_adapter`` then finds them inconsistent in most cases (ranks, keys, DoRA).
    """
    tag = uuid.uuid4().hex[:12]
    temps: dict[str, Path] = {}
    backups: dict[str, Path] = {}
    replaced: list[str] = []
    try:
        for name, data in files.items():
            temp = directory / f".{name}.{tag}.tmp"
            temps[name] = temp
            with open(temp, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for name in files:
            target = directory / name
            if target.exists():
                backup = directory / f".{name}.{tag}.bak"
                try:
                    os.link(target, backup)
                except OSError:
                    shutil.copy2(target, backup)
                backups[name] = backup
        for name in files:
            os.replace(temps[name], directory / name)
            replaced.append(name)
        _fsync_directory(directory)
    except BaseException:
        for name in reversed(replaced):
            target = directory / name
            if name in backups:
                os.replace(backups.pop(name), target)
            else:
                target.unlink(missing_ok=True)
        raise
    finally:
        for path in [*temps.values(), *backups.values()]:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents (``FileExistsError`` if one is a file); return
    the folders this call created, outermost first (one made meanwhile by another process is not
    among them)."""
    missing = []
    for path in (folder, *folder.parents):
        if path.is_dir():
            break
        missing.append(path)
    created: list[Path] = []
    try:
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                if not path.is_dir():
                    raise
                continue
            created.append(path)
    except BaseException:
        _remove_folders(created)
        raise
    return created


def _remove_folders(created: list[Path]) -> None:
    """Remove ``created`` (outermost first, as :func:`_make_folders` returns them), innermost
    first; a folder that is no longer empty (another writer's files) stays."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            pass


def save_adapter(model: nn.Module, directory: str | os.PathLike[str], *, adapter_name: str | None = None) -> Path:
    """Save ``model``'s adapter layers as a Hugging Face PEFT adapter; returns the folder.

    Writes ``adapter_model.safetensors`` and ``adapter_config.json`` to ``directory`` (created if
    missing) for ``adapter_name=None`` or ``"default"``, else to ``directory/<adapter_name>/``, the
    layout of Hugging Face PEFT's ``save_pretrained``. The files load in
    ``peft.PeftModel.from_pretrained(base, directory)`` and in :func:`load_adapter`.

    Each adapter layer is saved once, under its first module name. A layer shared under names
    that Hugging Face PEFT would not all adapt (``model.dec = model.enc``: it adapts ``enc`` only)
    gets a ``UserWarning`` naming them, before anything is written: the file computes
    something else there. The config's ``r`` and
    ``lora_alpha`` are the most common rank and alpha; other layers get ``rank_pattern``/
    ``alpha_pattern`` entries. Trained biases are saved when they train (``requires_grad``):
    those of the adapter layers (``bias="lora_only"``), or every bias (``bias="all"``).

    The save is atomic: both files are written to temporary files in the folder and fsynced, then
    renamed over the old ones (a failed second rename undoes the first). On any error, the files
    that were in the folder before are still there, unchanged, and the folders this call created
    are removed (never ones that existed before). Raises ``ValueError`` if the model has no adapter
    layers, if its adapter tensors are on the meta device (no values: materialise the model
    first), or if its layers mix what one file cannot hold (methods, use_rslora, two
    quantizations, DoRA epsilon, LoRA+ ratio, PiSSA and non-PiSSA). QLoRA layers beside LoRA
    layers on float bases (QDoRA beside DoRA) are one adapter, as a model loaded in 4 bits that
    keeps some layers unquantized (T5's ``wo``) has them: our field lists the float ones.
    """
    model = unwrapped(model)  # the files name the model's own modules, not _orig_mod. / module.
    folder = adapter_directory(directory, adapter_name)
    tensors, config, ours = _build_files(model)
    from safetensors.torch import save

    metadata = {"format": "pt"}
    if ours is not None:
        metadata[METADATA_KEY] = json.dumps(ours, sort_keys=True)
    files = {
        WEIGHTS_NAME: save(tensors, metadata=metadata),
        CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"),
    }
    if adapter_name is not None and folder.is_file():
        raise NotADirectoryError(
            f"adapter_name: {str(folder)!r} is a file; the adapter {adapter_name!r} is saved into a "
            "folder of that name"
        )
    # before anything is written: a warning turned into an error (-W error) leaves no new files
    _warn_shared(model, "save_adapter()", f"the file {str(folder)!r}")
    created = _make_folders(folder)
    try:
        _write_atomically(folder, files)
    except BaseException:  # a failed save leaves no empty adapter folder behind
        _remove_folders(created)
        raise
    return folder


