"""What an adapter file holds, and reading it: the layout's names, :class:`AdapterFile`,
:func:`read_adapter` and the checks on the files alone."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..model import METHODS
from ..model._methods import QUANTIZED_BASE_METHODS
from ..model._tree import _PatternKeys, _suffix_matches


WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_BIN_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
DEFAULT_ADAPTER = "default"
#: the prefix Hugging Face PEFT puts before every module path in the weights file
KEY_PREFIX = "base_model.model."
#: the safetensors metadata key of our field (a JSON object, as metadata values are strings)
METADATA_KEY = "peft_layers"
#: the newest version of our ``"peft_layers"`` field this library reads. A file says the lowest
#: version that describes it: 2 adds ``float_modules``, so every other file stays readable by
#: peft_layers releases that know version 1 only
FORMAT_VERSION = 2

_DORA_EPSILON = 1e-8
_LORA_PLUS_RATIO = 16.0
#: Hugging Face ``bias`` values and ours (``inject_adapters(bias=...)``)
_BIAS_FROM_HF = {"none": "none", "all": "all", "lora_only": "adapter_only"}
_BIAS_TO_HF = {ours: theirs for theirs, ours in _BIAS_FROM_HF.items()}
#: ``init_lora_weights`` values that leave the base weight alone: any start of A, B will do,
#: since the file overwrites them
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
}
#: LoraConfig fields that change what the adapter computes in ways we do not support
_UNSUPPORTED_FIELDS = (
    "lora_bias", "use_qalora", "alora_invocation_tokens",
    "trainable_token_indices", "layer_replication", "target_parameters", "use_bdlora",
    "arrow_config", "kasa_config", "monteclora_config",
)
#: files of a whole model's checkpoint (transformers' ``save_pretrained``), named in errors
_FULL_CHECKPOINTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
#: VeLoRA (``velora_config``) changes only what backward keeps, so its adapters compute plain LoRA:
#: we load them without the per-layer VeLoRA buffers, whose keys end in this
_VELORA_KEY = re.compile(r"\.lora_velora_[A-Za-z_]+$")


# ---- what a file holds -----------------------------------------------------------------------
@dataclass
class ModuleAdapter:
    """The adapter tensors of one module in a file, in our naming.

    ``lora_A`` (rank, in), ``lora_B`` (out, rank), ``magnitude`` (out,) or None, ``bias`` (out,) or
    None (the base layer's bias, saved when biases were trained); ``rank`` and ``alpha`` as the
    config gives them for this module; ``base_weight`` (out, in) or None: the base layer's full
    weight, which Hugging Face PEFT saves for targeted embedding layers (``lm_head``) and which a
    load copies into the base.
    """

    path: str
    lora_A: Tensor
    lora_B: Tensor
    magnitude: Tensor | None
    bias: Tensor | None
    rank: int
    alpha: float
    base_weight: Tensor | None = None


@dataclass
class AdapterFile:
    """An adapter directory read and checked by :func:`read_adapter`, not yet tied to a model.

    Attributes:
        directory: where the files are. config: the parsed ``adapter_config.json``.
        method: ``"lora"``, ``"lora_plus"``, ``"dora"``, ``"qlora"`` or ``"qdora"``.
        modules: module path -> its :class:`ModuleAdapter`, in file order.
        other_biases: module path -> bias of a module that is not an adapter layer
            (``bias="all"``).
        alias_biases: module path -> a bias that Hugging Face PEFT's ``bias="all"`` writes under
            the other names of a shared adapter layer or module to save (a block used twice):
            ``<p>.base_layer.bias`` without factors, ``<p>.modules_to_save.bias``. A load checks
            that the path names one of the file's modules, with that bias.
        saved_modules: module path -> the state dict of a module to save (``modules_to_save``:
            trained in full, see :class:`~peft_layers.ModuleToSave`), in file order.
        use_rslora, dropout, bias_mode (ours: "none", "all", "adapter_only"), init ("kaiming" for
        any start that leaves the base alone, or "pissa"), layer_kwargs (method-specific keyword
        arguments for the layer classes: ``epsilon``, ``lr_ratio``, ``quant``, ...).
        float_modules: paths of ``modules`` that a QLoRA/QDoRA file keeps on a float base (plain
            LoRA/DoRA there), as the layers a model keeps unquantized (T5's ``wo``); empty for
            other files.
    """

    directory: Path
    config: dict[str, Any]
    method: str
    modules: dict[str, ModuleAdapter]
    other_biases: dict[str, Tensor]
    use_rslora: bool
    dropout: float
    bias_mode: str
    init: str
    layer_kwargs: dict[str, Any] = field(default_factory=dict)
    saved_modules: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    alias_biases: dict[str, Tensor] = field(default_factory=dict)
    float_modules: tuple[str, ...] = ()

    @property
    def is_dora(self) -> bool:
        """Whether the adapter is DoRA (it has magnitudes): ``method`` is "dora" or "qdora"."""
        return self.method in ("dora", "qdora")

    def state_dict(self) -> dict[str, Tensor]:
        """The adapter tensors under the keys of ``adapter_state_dict(model)``
        (``"<path>.lora_A"``, ``"<path>.lora_B"``, ``"<path>.magnitude"``,
        ``"<path>.trained.<key>"`` for a module to save, and the trained biases:
        ``"<path>.base_layer.bias"`` in an adapter layer, ``"<path>.bias"`` elsewhere)."""
        state: dict[str, Tensor] = {}
        for path, module in self.modules.items():
            prefix = f"{path}." if path else ""
            state[prefix + "lora_A"] = module.lora_A
            state[prefix + "lora_B"] = module.lora_B
            if module.magnitude is not None:
                state[prefix + "magnitude"] = module.magnitude
            if module.bias is not None:
                state[prefix + "base_layer.bias"] = module.bias
        for path, saved in self.saved_modules.items():
            for key, tensor in saved.items():
                state[f"{path}.trained.{key}"] = tensor
        for path, bias in self.other_biases.items():
            state[f"{path}.bias" if path else "bias"] = bias
        return state

    def scaling(self, path: str) -> float:
        """``alpha / rank`` (rsLoRA: ``alpha / sqrt(rank)``) of the module at ``path``."""
        module = self.modules[path]
        return module.alpha / (math.sqrt(module.rank) if self.use_rslora else module.rank)


# ---- directories -------------------------------------------------------------------------------
def _check_adapter_name(adapter_name: Any) -> str:
    if adapter_name is None:
        return DEFAULT_ADAPTER
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name: expected a str or None, got {type(adapter_name).__name__}")
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not adapter_name or adapter_name in (".", "..") or any(s in adapter_name for s in [*separators, "\0"]):
        raise ValueError(
            f"adapter_name: expected a folder name (non-empty, no path separator or NUL, not '.' or "
            f"'..'), got {adapter_name!r}"
        )
    return adapter_name


def _check_directory(directory: Any) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a str or os.PathLike, got {type(directory).__name__}")
    # Path("") is ".": an unset variable would save into (or load from) the working directory
    if os.fspath(directory) in ("", b""):
        raise ValueError("directory: expected a path, got an empty one (write '.' for the working directory)")
    if "\0" in str(os.fspath(directory)):
        raise ValueError(f"directory: a path cannot hold a NUL character, got {os.fspath(directory)!r}")
    path = Path(directory)
    try:
        is_file = path.is_file()
    except OSError as error:  # a name longer than the file system takes (ENAMETOOLONG), ...
        shown = repr(str(path)) if len(str(path)) <= 80 else f"{str(path)[:80]!r}..."
        raise ValueError(f"directory: {shown} cannot be a path here ({error.strerror})") from None
    if is_file:
        raise NotADirectoryError(
            f"directory: {str(path)!r} is a file; an adapter is a directory holding {WEIGHTS_NAME} and "
            f"{CONFIG_NAME} (pass the directory that holds them)"
        )
    inside_file = next((parent for parent in path.parents if parent.is_file()), None)
    if inside_file is not None:
        raise NotADirectoryError(f"directory: {str(path)!r} lies under {str(inside_file)!r}, which is a file")
    return path


def adapter_directory(directory: str | os.PathLike[str], adapter_name: str | None = None) -> Path:
    """Where the adapter ``adapter_name`` lives under ``directory``: the root for ``None`` or
    ``"default"``, ``<directory>/<adapter_name>/`` otherwise (Hugging Face PEFT's layout)."""
    root = _check_directory(directory)
    name = _check_adapter_name(adapter_name)
    return root if name == DEFAULT_ADAPTER else root / name


def list_adapters(directory: str | os.PathLike[str]) -> list[str]:
    """The names of the adapters saved under ``directory``: ``"default"`` if the root holds an
    ``adapter_config.json``, then every direct subfolder that holds one, sorted."""
    root = _check_directory(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"directory: {str(root)!r} is not a directory")
    names = [DEFAULT_ADAPTER] if (root / CONFIG_NAME).is_file() else []
    names += sorted(
        sub.name for sub in root.iterdir()
        if sub.is_dir() and sub.name != DEFAULT_ADAPTER and (sub / CONFIG_NAME).is_file()
    )
    return names


# ---- reading -----------------------------------------------------------------------------------
def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as error:  # bad UTF-8 or JSON, an over-long int, deep nesting
        raise ValueError(f"{path}: not a valid JSON adapter config ({type(error).__name__}: {error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes that safetensors has parsed already: the file
    opens with the header's length (8 bytes, little-endian) and then the JSON header."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of a weights file and its metadata (none for ``.bin``)."""
    metadata: dict[str, str] = {}
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load

        data = path.read_bytes()
        try:
            tensors = load(data)
        except Exception as error:  # safetensors raises its own SafetensorError
            raise ValueError(
                f"{path}: not a valid safetensors file, truncated or corrupt ({error})"
            ) from None
        metadata = _safetensors_metadata(data)
    else:
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle, zip and unpickler errors of every kind
            raise ValueError(
                f"{path}: not a valid torch weights file, truncated or corrupt ({error})"
            ) from None
        if not isinstance(tensors, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in tensors.items()
        ):
            raise ValueError(f"{path}: expected a dict of name -> Tensor")
    float32_max = torch.finfo(torch.float32).max
    for key, tensor in tensors.items():
        # a pickled .bin can hold any tensor: only dense ones with values can be checked and copied
        if tensor.layout != torch.strided or tensor.is_meta:
            where = "on the meta device (no values)" if tensor.is_meta else f"of layout {tensor.layout}"
            raise ValueError(f"{path}: tensor {key!r} is {where}; expected a dense tensor with values")
        # complex passes as "not floating", as an integer buffer does, and loses its imaginary part
        if tensor.is_complex():
            raise ValueError(f"{path}: tensor {key!r} has dtype {tensor.dtype}; adapter files hold real tensors")
        if not tensor.is_floating_point():
            continue
        if tensor.dtype not in _DTYPES.values():  # float8: no isfinite, and no adapter layer holds it
            raise ValueError(
                f"{path}: tensor {key!r} has dtype {tensor.dtype}; expected one of {sorted(_DTYPES)} "
                "(or an integer buffer of a module to save)"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: tensor {key!r} holds NaN or infinite values")
        if tensor.dtype == torch.float64 and tensor.numel() and float(tensor.abs().max()) > float32_max:
            raise ValueError(
                f"{path}: tensor {key!r} (float64) holds values beyond float32's range, which a float32 "
                "or half-precision layer would load as inf"
            )
    return dict(tensors), metadata


def _config_value(config: Mapping[str, Any], name: str, default: Any) -> Any:
    """``config[name]``, with ``default`` for a missing key or a null value."""
    value = config.get(name, default)
    return default if value is None and default is not None else value


def _check_int(value: Any, name: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{path}: {name} must be an int > 0, got {value!r}")
    return value


def _check_alpha(value: Any, name: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{path}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_patterns(config: Mapping[str, Any], name: str, path: Path, check) -> dict[str, Any]:
    patterns = config.get(name)
    patterns = {} if patterns is None else patterns  # not `or {}`: a 0 or false is an error, not "none"
    if not isinstance(patterns, dict):
        raise ValueError(f"{path}: {name} must be an object of name pattern -> value, got {patterns!r}")
    for key, value in patterns.items():
        try:  # compiled as Hugging Face PEFT matches it (a global flag is valid alone, not there)
            re.compile(rf"(.*\.)?({key})$")
        except re.error as error:
            raise ValueError(f"{path}: {name} key {key!r} is not a valid regex ({error})") from None
        check(value, f"{name}[{key!r}]", path)
    return patterns


def _target_matches(target_modules: Any, name: str) -> bool:
    """Hugging Face PEFT's ``target_modules`` rule: a string is a regex that must match the whole
    name; a list holds exact names and name suffixes (whole dotted components). Give a long list
    as a set (:func:`_target_lookup`): each of the name's dotted tails is looked up in it."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(tail in target_modules for tail in _dotted_tails(name))


def _dotted_tails(name: str) -> list[str]:
    """``name`` and each of its whole-component suffixes: those ``t`` with ``_suffix_matches(t, name)``."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def _target_lookup(target_modules: Any) -> Any:
    """``target_modules`` as :func:`_target_matches` asks it fastest: a list as a frozenset."""
    return frozenset(target_modules) if isinstance(target_modules, list) else target_modules


@dataclass(frozen=True)
class _LayerSelection:
    """The config fields beside ``target_modules`` by which Hugging Face PEFT leaves a module
    without an adapter (its ``check_target_module_exists``): ``exclude_modules`` (a regex matching
    the whole name, or a list of names and name suffixes), and for a list of ``target_modules``,
    ``layers_to_transform`` (layer indices; the index is the number after ``layers_pattern``, or
    after the first dotted component followed by a number when there is no pattern), which a
    module named exactly in the list (``lm_head``, a full path) escapes."""

    exclude: str | list[str] | None
    layers: int | list[int] | None
    patterns: list[str]

    @classmethod
    def from_config(cls, config: Mapping[str, Any], path: Path) -> _LayerSelection:
        exclude = config.get("exclude_modules")
        if isinstance(exclude, (str, list)) and not exclude:
            exclude = None  # "" or []: none, as Hugging Face PEFT reads them (a 0 or false is refused)
        if exclude is not None:
            names = [exclude] if isinstance(exclude, str) else exclude
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{path}: exclude_modules must be a regex string or a list of names, got {exclude!r}")
            if isinstance(exclude, str):
                _compile_or_raise(exclude, "exclude_modules", path)
        layers = config.get("layers_to_transform")
        if layers == []:
            layers = None
        if layers is not None and not (
            _is_int(layers) or (isinstance(layers, list) and all(_is_int(i) for i in layers))
        ):  # a negative index matches no layer, as in Hugging Face PEFT
            raise ValueError(f"{path}: layers_to_transform must be a layer index or a list of them, got {layers!r}")
        patterns = config.get("layers_pattern")
        patterns = [] if patterns is None or patterns == "" else patterns
        patterns = [patterns] if isinstance(patterns, str) else patterns
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"{path}: layers_pattern must be a name or a list of names, got {config.get('layers_pattern')!r}")
        for pattern in patterns:
            _compile_or_raise(_layer_index_regex(pattern), f"layers_pattern {pattern!r}", path)
        return cls(exclude, layers, patterns)

    def why_left_out(self, module: str, target_modules: str | list[str] | None) -> str | None:
        """Which field leaves ``module`` (matched by ``target_modules``) without an adapter, or None."""
        if isinstance(self.exclude, str):
            if re.fullmatch(self.exclude, module):
                return f"exclude_modules={self.exclude!r} excludes it"
        elif self.exclude is not None and any(_suffix_matches(name, module) for name in self.exclude):
            return f"exclude_modules={self.exclude!r} excludes it"
        # the layer fields apply to a list of targets only, and not to a module it names exactly
        if self.layers is None or not isinstance(target_modules, list) or module in target_modules:
            return None
        if self.patterns:
            found = (re.match(_layer_index_regex(p), module) for p in self.patterns)
            match = next((m for m in found if m is not None), None)
        else:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        index = int(match.group("idx")) if match is not None else None
        wanted = [self.layers] if isinstance(self.layers, int) else self.layers
        if index in wanted:
            return None
        where = f"its layer index is {index}" if index is not None else "it has no layer index"
        return f"{where}, not in layers_to_transform={self.layers!r} (layers_pattern={self.patterns or None!r})"


def _may_be_adapted(
    module: str, target_modules: str | list[str] | None, selection: _LayerSelection, lookup: Any = None
) -> bool:
    """Whether Hugging Face PEFT, under the config, could put an adapter at ``module``:
    ``target_modules`` matches it (or is unset, which decides nothing) and no other field leaves
    it out."""
    if target_modules is None:
        return True
    lookup = _target_lookup(target_modules) if lookup is None else lookup
    return _target_matches(lookup, module) and selection.why_left_out(module, target_modules) is None


def _layer_index_regex(layers_pattern: str) -> str:
    """The layer index after ``layers_pattern`` in a module name, as Hugging Face PEFT reads it."""
    return rf"(?:^|.*?\.){layers_pattern}\.(?P<idx>\d+)\."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _compile_or_raise(pattern: str, name: str, path: Path) -> None:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{path}: {name} is not a valid regex ({error})") from None


def _our_field(
    config: Mapping[str, Any], metadata: Mapping[str, str], config_path: Path, weights_path: Path
) -> tuple[Any, Path]:
    """Our ``"peft_layers"`` field (None if absent) and the file it came from: the weights'
    metadata, where :func:`save_adapter` writes it, or the config, where earlier development
    versions wrote it. Both at once must agree."""
    in_config = config.get(METADATA_KEY)
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return in_config, config_path
    try:
        ours = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{weights_path}: metadata {METADATA_KEY!r} is not valid JSON ({error})") from None
    if in_config is not None and in_config != ours:
        raise ValueError(
            f"{config_path}: field {METADATA_KEY!r} {in_config!r} contradicts the metadata of "
            f"{weights_path.name} ({ours!r})"
        )
    return ours, weights_path


def _parse_our_field(ours: Any, use_dora: bool, path: Path) -> tuple[str, dict[str, Any]]:
    """The method and its layer keyword arguments, from our field (read from ``path``) or, when
    there is none, from the config's ``use_dora``."""
    if ours is None:
        return ("dora" if use_dora else "lora"), {}
    if not isinstance(ours, dict):
        raise ValueError(f"{path}: peft_layers must be an object, got {ours!r}")
    version = ours.get("version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{path}: peft_layers.version must be an integer >= 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: peft_layers.version {version!r} is not supported (this peft_layers reads 1 to "
            f"{FORMAT_VERSION}); upgrade peft_layers"
        )
    method = ours.get("method", "dora" if use_dora else "lora")
    if method not in METHODS:
        raise ValueError(f"{path}: peft_layers.method must be one of {METHODS}, got {method!r}")
    if (method in ("dora", "qdora")) != use_dora:
        raise ValueError(
            f"{path}: peft_layers.method {method!r} contradicts use_dora={use_dora} of {CONFIG_NAME}"
        )
    kwargs: dict[str, Any] = {}
    if "epsilon" in ours:
        if method not in ("dora", "qdora"):
            raise ValueError(f"{path}: peft_layers.epsilon is set, but method {method!r} is not DoRA")
        kwargs["epsilon"] = _check_alpha(ours["epsilon"], "peft_layers.epsilon", path)
    if "lr_ratio" in ours:
        if method != "lora_plus":
            raise ValueError(f"{path}: peft_layers.lr_ratio is set, but method {method!r} is not lora_plus")
        kwargs["lr_ratio"] = _check_alpha(ours["lr_ratio"], "peft_layers.lr_ratio", path)
    quant = ours.get("quant")
    if method in QUANTIZED_BASE_METHODS:
        if quant is not None:
            kwargs.update(_parse_quant(quant, path))
    elif quant is not None:
        raise ValueError(f"{path}: peft_layers.quant is set, but method {method!r} is not quantized")
    return method, kwargs


def _parse_quant(quant: Any, path: Path) -> dict[str, Any]:
    if not isinstance(quant, dict):
        raise ValueError(f"{path}: peft_layers.quant must be an object, got {quant!r}")
    kwargs: dict[str, Any] = {}
    scheme = quant.get("scheme")
    if scheme not in ("nf4", "fp4", "int8"):
        raise ValueError(f"{path}: peft_layers.quant.scheme must be 'nf4', 'fp4' or 'int8', got {scheme!r}")
    kwargs["quant"] = scheme
    if quant.get("blocksize") is not None:
        kwargs["blocksize"] = _check_int(quant["blocksize"], "peft_layers.quant.blocksize", path)
    if quant.get("double_quant") is not None:
        if not isinstance(quant["double_quant"], bool):
            raise ValueError(
                f"{path}: peft_layers.quant.double_quant must be a bool, got {quant['double_quant']!r}"
            )
        kwargs["double_quant"] = quant["double_quant"]
    if quant.get("compute_dtype") is not None:
        name = quant["compute_dtype"]
        if not isinstance(name, str) or name not in _DTYPES:
            raise ValueError(
                f"{path}: peft_layers.quant.compute_dtype must be one of {sorted(_DTYPES)}, got {name!r}"
            )
        kwargs["compute_dtype"] = _DTYPES[name]
    return kwargs


#: key suffixes of the layout and the kind of tensor each names; all but "bias" are adapter keys
_KEY_KINDS = (
    ("lora_A.weight", "lora_A"),
    ("lora_B.weight", "lora_B"),
    ("lora_magnitude_vector", "magnitude"),
    ("base_layer.bias", "base_bias"),
    ("base_layer.weight", "base_weight"),
    ("bias", "bias"),
)
_ADAPTER_SUFFIXES = tuple(suffix for suffix, kind in _KEY_KINDS if kind != "bias")


def _module_before(rest: str, suffix: str) -> str | None:
    """The module path of the key ``rest`` (prefix removed) if it ends in ``suffix``: ``"p"`` for
    ``"p.<suffix>"``, ``""`` for the suffix alone; else None."""
    if rest == suffix or rest.endswith("." + suffix):
        return rest[: -len(suffix)].rstrip(".")
    return None


def _split_key(key: str, path: Path, hint: str = "") -> tuple[str, str]:
    """``"base_model.model.<p>.lora_A.weight"`` -> ``(p, "lora_A")``; likewise lora_B,
    magnitude, base_bias (``<p>.base_layer.bias``), base_weight (``<p>.base_layer.weight``) and
    bias (``<q>.bias``). ``hint`` ends the message for a key of no known form."""
    if not key.startswith(KEY_PREFIX):
        raise ValueError(f"{path}: unexpected key {key!r}: keys start with {KEY_PREFIX!r} in this layout")
    rest = key[len(KEY_PREFIX):]
    for suffix, kind in _KEY_KINDS:
        module = _module_before(rest, suffix)
        if module is not None:
            if kind == "bias" and re.search(r"(^|\.)lora_[A-Za-z_]+$", module):
                break  # lora_B.bias and the like: a LoRA bias, which we do not support
            return module, kind
    if re.search(r"\.lora_embedding_[AB]$", rest):
        raise ValueError(
            f"{path}: key {key!r} is a LoRA factor of an embedding layer (Hugging Face PEFT's "
            "lora_embedding_A/B), which peft_layers does not support: its adapters wrap linear layers"
        )
    raise ValueError(
        f"{path}: unexpected key {key!r}; this layout has <path>.lora_A.weight, <path>.lora_B.weight, "
        "<path>.lora_magnitude_vector, <path>.base_layer.weight (a targeted embedding's base weight) and, "
        f"with trained biases, <path>.base_layer.bias / <path>.bias{hint}"
    )


def _saved_module_key(
    key: str, names: list[str], *, exact: bool, adapters: Collection[str] = ()
) -> tuple[str, str] | None:
    """``"base_model.model.<p>.<k>"`` -> ``(p, k)`` when ``p`` is a module to save: the shortest
    dotted prefix of the key that is one of ``names`` (``exact``: the full names our field
    records) or ends with one (the config's ``modules_to_save``, matched as Hugging Face PEFT
    matches them: the module's name ends with the string). None for keys of other modules and
    for the adapter keys of ``adapters`` (the modules with factors in the file)."""
    rest = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else None
    if not names or rest is None:
        return None
    parts = rest.split(".")
    last = len(parts) - 1  # the longest prefix that leaves a key
    # exact names win over the layout's suffixes (a module to save named "base_layer" has the key
    # "base_layer.weight"). A suffix match must not reach into an adapter suffix ("fc.base_layer"
    # ends "layer"), nor take an adapter module's keys; a module to save that holds a module named
    # base_layer has such keys too ("head.base_layer.weight")
    before = (_module_before(rest, suffix) for suffix in _ADAPTER_SUFFIXES)
    module = None if exact else next((m for m in before if m is not None), None)
    if module is not None:
        if not module or module in adapters:
            return None
        last = module.count(".") + 1
    for end in range(1, last + 1):
        path = ".".join(parts[:end])
        matches = (path in names) if exact else any(path.endswith(name) for name in names)
        if matches:
            return path, ".".join(parts[end:])
    return None


def _factor_modules(tensors: Mapping[str, Tensor]) -> set[str]:
    """The module paths that have a LoRA factor (``<p>.lora_A.weight``, ``<p>.lora_B.weight``)."""
    rests = [key[len(KEY_PREFIX):] for key in tensors if key.startswith(KEY_PREFIX)]
    modules = (_module_before(rest, suffix) for rest in rests for suffix in ("lora_A.weight", "lora_B.weight"))
    return {module for module in modules if module is not None}


def _overlaps(path: str, other: str) -> bool:
    """Whether two module paths are one module or one lies inside the other."""
    return path == other or other.startswith(path + ".") or path.startswith(other + ".")


#: keys that Hugging Face PEFT's bias="all" writes from inside its modules-to-save wrapper: its
#: original module's bias and a second copy of the trained one (the module's own key has it)
_HF_WRAPPER_KEYS = ("original_module.", "modules_to_save.")
#: the same keys under another name of a shared module to save, which matches no saved name
_HF_WRAPPER_BIAS = re.compile(r"(.+)\.(modules_to_save|original_module)\.bias")


def read_adapter(directory: str | os.PathLike[str], *, adapter_name: str | None = None) -> AdapterFile:
    """Read and check an adapter saved by :func:`save_adapter` or by Hugging Face PEFT.

    Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (or, if there is none,
    ``adapter_model.bin`` through ``torch.load(weights_only=True)``) from
    :func:`adapter_directory` ``(directory, adapter_name)``. Checks that the config is a
    ``"LORA"`` config we can reproduce, that every key has the layout's form, that every module has
    ``lora_A`` (r, in) and ``lora_B`` (out, r) with matching ranks, a magnitude (out,) exactly
    when the config says DoRA, a rank equal to the config's (``r`` or its ``rank_pattern``), a
    full base weight ``<p>.base_layer.weight`` (Hugging Face PEFT writes it for targeted
    embedding layers) of shape (out, in), and that every tensor is floating point and finite.

    Raises ``FileNotFoundError`` if the folder or a file is missing, ``NotADirectoryError`` if
    ``directory`` is a file, and ``ValueError`` naming the file for anything else.
    """
    folder = adapter_directory(directory, adapter_name)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        root = _check_directory(directory)
        if not root.is_dir():
            raise FileNotFoundError(
                f"directory: {str(root)!r} does not exist (adapters are read from local directories; "
                "a Hugging Face Hub id must be downloaded first, e.g. huggingface_hub.snapshot_download)"
            )
        checkpoint = [name for name in _FULL_CHECKPOINTS if (folder / name).is_file()]
        hint = (
            f"; {checkpoint[0]} here is a whole model's checkpoint (transformers' save_pretrained, "
            "Trainer's save_model): inject the same adapters and model.load_state_dict() it, and "
            "save adapters alone with save_adapter()"
            if checkpoint else ""
        )
        raise FileNotFoundError(
            f"{config_path}: no adapter config here (adapter_name={adapter_name!r}); "
            f"adapters found under {str(root)!r}: {list_adapters(root)}{hint}"
        )
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        weights_path = folder / WEIGHTS_BIN_NAME
        if not weights_path.is_file():
            raise FileNotFoundError(
                f"{folder}: has {CONFIG_NAME} but neither {WEIGHTS_NAME} nor {WEIGHTS_BIN_NAME}"
            )
    config = _read_config(config_path)
    tensors, metadata = _read_tensors(weights_path)
    return _parse(folder, config_path, config, weights_path, tensors, metadata)


def _parse(
    folder: Path,
    config_path: Path,
    config: dict[str, Any],
    weights_path: Path,
    tensors: dict[str, Tensor],
    metadata: Mapping[str, str],
) -> AdapterFile:
    cp = config_path
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(
            f"{cp}: peft_type must be 'LORA', got {peft_type!r}; only LoRA/DoRA adapters are supported"
        )
    for name in _UNSUPPORTED_FIELDS:
        if config.get(name) not in (None, False, [], {}, ""):
            raise ValueError(f"{cp}: {name}={config[name]!r} is not supported by peft_layers")
    r = _check_int(config.get("r", 8), "r", cp)
    lora_alpha = _check_alpha(config.get("lora_alpha", 8), "lora_alpha", cp)
    use_dora = _config_value(config, "use_dora", False)
    use_rslora = _config_value(config, "use_rslora", False)
    # fan_in_fan_out only says how the base stores its weight; each layer's type says it too and
    # wins, as in Hugging Face PEFT (transformers' Conv1D stores (in, out), nn.Linear (out, in))
    fan_in_fan_out = _config_value(config, "fan_in_fan_out", False)
    for name, value in (("use_dora", use_dora), ("use_rslora", use_rslora), ("fan_in_fan_out", fan_in_fan_out)):
        if not isinstance(value, bool):
            raise ValueError(f"{cp}: {name} must be true or false, got {value!r}")
    dropout = _config_value(config, "lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{cp}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    bias = _config_value(config, "bias", "none")
    if not isinstance(bias, str) or bias not in _BIAS_FROM_HF:
        raise ValueError(f"{cp}: bias must be one of {tuple(_BIAS_FROM_HF)}, got {bias!r}")
    init_weights = _config_value(config, "init_lora_weights", True)
    if init_weights == "pissa":
        init = "pissa"
    elif any(init_weights is v or (isinstance(v, str) and init_weights == v) for v in _PLAIN_INITS):
        init = "kaiming"
    else:
        raise ValueError(
            f"{cp}: init_lora_weights={init_weights!r} changes the base weights in a way peft_layers "
            f"does not reproduce; supported: {list(_PLAIN_INITS) + ['pissa']}"
        )
    rank_pattern = _check_patterns(config, "rank_pattern", cp, _check_int)
    alpha_pattern = _check_patterns(config, "alpha_pattern", cp, _check_alpha)
    target_modules = config.get("target_modules")
    if target_modules is not None and not (
        isinstance(target_modules, str)
        or (isinstance(target_modules, list) and all(isinstance(t, str) for t in target_modules))
    ):
        raise ValueError(
            f"{cp}: target_modules must be a regex string or a list of names, got {target_modules!r}"
        )
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as error:
            raise ValueError(f"{cp}: target_modules {target_modules!r} is not a valid regex ({error})") from None
    selection = _LayerSelection.from_config(config, cp)
    target_lookup = _target_lookup(target_modules)
    rank_keys, alpha_keys = _PatternKeys(rank_pattern), _PatternKeys(alpha_pattern)
    ours, ours_path = _our_field(config, metadata, cp, weights_path)
    method, layer_kwargs = _parse_our_field(ours, use_dora, ours_path)
    # our field names the modules to save exactly where Hugging Face PEFT's suffix rule would take
    # more modules than were saved (see _build_files)
    exact_saved = isinstance(ours, dict) and "modules_to_save" in ours
    saved_names = ours["modules_to_save"] if exact_saved else config.get("modules_to_save")
    saved_names = [] if saved_names is None else saved_names  # a 0 or false is refused below
    if not isinstance(saved_names, list) or not all(isinstance(name, str) and name for name in saved_names):
        where = f"{ours_path}: peft_layers." if exact_saved else f"{cp}: "
        raise ValueError(f"{where}modules_to_save must be a list of module names, got {saved_names!r}")
    if method == "lora_plus":
        layer_kwargs.setdefault("lr_ratio", _LORA_PLUS_RATIO)

    # group the tensors by module
    wp = weights_path
    grouped: dict[str, dict[str, Tensor]] = {}
    saved_modules: dict[str, dict[str, Tensor]] = {}
    alias_biases: dict[str, Tensor] = {}
    velora = config.get("velora_config") not in (None, False, {})
    unexpected_hint = (
        "; the config's ensure_weight_tying=true saves the modules tied to its modules to save or "
        "targets under their own names, which peft_layers does not support"
        if config.get("ensure_weight_tying") is True
        else ""
    )
    factor_modules = _factor_modules(tensors)
    for key in sorted(tensors):  # safetensors hands keys back in no fixed order
        if velora and _VELORA_KEY.search(key):
            continue
        tensor = tensors[key]
        saved = _saved_module_key(key, saved_names, exact=exact_saved, adapters=factor_modules)
        if saved is not None:  # a module's own state: integer buffers (BatchNorm's count) too
            if not saved[1].startswith(_HF_WRAPPER_KEYS):
                saved_modules.setdefault(saved[0], {})[saved[1]] = tensor
            continue
        wrapper_bias = _HF_WRAPPER_BIAS.fullmatch(key[len(KEY_PREFIX):]) if key.startswith(KEY_PREFIX) else None
        if wrapper_bias is not None and bias == "all":  # another name of a shared module to save
            if wrapper_bias.group(2) == "modules_to_save":  # the trained bias; the original's is the base's
                alias_biases[wrapper_bias.group(1)] = tensor
            continue
        if not tensor.is_floating_point():
            raise ValueError(f"{wp}: tensor {key!r} has dtype {tensor.dtype}; adapter tensors are floating point")
        module, kind = _split_key(key, wp, unexpected_hint)
        grouped.setdefault(module, {})[kind] = tensor
    other_biases = {}
    modules: dict[str, ModuleAdapter] = {}
    for module, parts in grouped.items():
        if "lora_A" not in parts and "lora_B" not in parts:
            if "base_bias" in parts and not _may_be_adapted(module, target_modules, selection, target_lookup):
                # no adapter can be at `module`: the key is the bias of the model's own module
                # named base_layer inside it (bias="all"), as Hugging Face PEFT loads it
                other_biases[f"{module}.base_layer" if module else "base_layer"] = parts.pop("base_bias")
            if set(parts) == {"base_bias"} and bias == "all":  # another name of a shared layer
                alias_biases[module] = parts["base_bias"]
                continue
            if set(parts) - {"bias"}:
                raise ValueError(f"{wp}: module {module!r} has {sorted(parts)} but no lora_A/lora_B")
            if "bias" in parts:
                other_biases[module] = parts["bias"]
            continue
        for kind in ("lora_A", "lora_B"):
            if kind not in parts:
                raise ValueError(f"{wp}: missing key {KEY_PREFIX}{module}.{kind}.weight")
        if "bias" in parts:
            raise ValueError(
                f"{wp}: unexpected key {KEY_PREFIX}{module}.bias for an adapter module "
                "(expected .base_layer.bias)"
            )
        a, b, m = parts["lora_A"], parts["lora_B"], parts.get("magnitude")
        if a.dim() in (3, 4, 5) and b.dim() == a.dim():
            raise ValueError(
                f"{wp}: {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are the factors of "
                "a convolution layer (Hugging Face PEFT's Conv1d/2d/3d LoRA), which peft_layers does not "
                "support: its adapters wrap linear layers"
            )
        parts_of_path = module.split(".")
        outer = next(
            (
                ".".join(parts_of_path[:i]) for i, part in enumerate(parts_of_path)
                if part == "base_layer" and {"lora_A", "lora_B"} & set(grouped.get(".".join(parts_of_path[:i]), ()))
            ),
            None,
        )
        if outer is not None:  # a module named base_layer of the model itself is no nesting
            raise ValueError(
                f"{wp}: {module!r} lies inside the base_layer of the adapter of {outer!r}: Hugging Face "
                "PEFT nests adapters so for nn.MultiheadAttention (its out_proj), which peft_layers does "
                "not support"
            )
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{wp}: {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not "
                "(r, in) and (out, r) with one r"
            )
        if use_dora and m is None:
            raise ValueError(
                f"{wp}: missing key {KEY_PREFIX}{module}.lora_magnitude_vector (the config says use_dora)"
            )
        if not use_dora and m is not None:
            raise ValueError(
                f"{wp}: unexpected key {KEY_PREFIX}{module}.lora_magnitude_vector: the config says "
                "use_dora=false, but the file holds DoRA magnitudes"
            )
        if m is not None and tuple(m.shape) != (b.shape[0],):
            raise ValueError(f"{wp}: {module!r}: lora_magnitude_vector {tuple(m.shape)} should be ({b.shape[0]},)")
        base_bias = parts.get("base_bias")
        if base_bias is not None and tuple(base_bias.shape) != (b.shape[0],):
            raise ValueError(f"{wp}: {module!r}: base_layer.bias {tuple(base_bias.shape)} should be ({b.shape[0]},)")
        base_weight = parts.get("base_weight")
        if base_weight is not None and tuple(base_weight.shape) != (b.shape[0], a.shape[1]):
            raise ValueError(
                f"{wp}: {module!r}: base_layer.weight {tuple(base_weight.shape)} should be "
                f"({b.shape[0]}, {a.shape[1]}) (out_features of lora_B, in_features of lora_A)"
            )
        pattern = rank_keys(module)
        rank = rank_pattern[pattern] if pattern is not None else r
        if a.shape[0] != rank:
            raise ValueError(
                f"{wp}: {module!r} has rank {a.shape[0]} but {cp.name} gives it rank {rank} "
                f"({'rank_pattern[' + repr(pattern) + ']' if pattern is not None else 'r'})"
            )
        pattern = alpha_keys(module)
        alpha = float(alpha_pattern[pattern]) if pattern is not None else lora_alpha
        if target_modules is not None and not _target_matches(target_lookup, module):
            raise ValueError(
                f"{wp}: module {module!r} is not matched by target_modules={target_modules!r} of {cp.name}"
            )
        left_out = selection.why_left_out(module, target_modules)
        if left_out is not None:  # Hugging Face PEFT would load no adapter there: the file contradicts itself
            raise ValueError(
                f"{wp}: module {module!r} has adapter tensors, but {cp.name} leaves it out: {left_out} "
                "(Hugging Face PEFT would load no adapter there)"
            )
        modules[module] = ModuleAdapter(module, a, b, m, base_bias, rank, alpha, base_weight)
    if not modules:
        raise ValueError(f"{wp}: holds no adapter tensors")
    inside = [(p, q) for p in saved_modules for q in modules if _overlaps(p, q)]
    if inside:
        raise ValueError(f"{wp}: the module to save {inside[0][0]!r} and the adapter module {inside[0][1]!r} overlap")
    if other_biases and bias != "all":
        raise ValueError(
            f"{wp}: holds biases of non-adapter modules {sorted(other_biases)} but {cp.name} says bias={bias!r}"
        )
    return AdapterFile(
        directory=folder, config=config, method=method, modules=modules, other_biases=other_biases,
        alias_biases=alias_biases,
        use_rslora=use_rslora, dropout=float(dropout), bias_mode=_BIAS_FROM_HF[bias], init=init,
        layer_kwargs=layer_kwargs, saved_modules=saved_modules,
        float_modules=_parse_float_modules(ours, method, modules, ours_path),
    )


def _parse_float_modules(ours: Any, method: str, modules: Mapping[str, Any], path: Path) -> tuple[str, ...]:
    """Our field's ``float_modules``: adapter modules of a QLoRA/QDoRA file on a float base."""
    names = ours.get("float_modules") if isinstance(ours, dict) else None
    if names is None:
        return ()
    if method not in QUANTIZED_BASE_METHODS:
        raise ValueError(f"{path}: peft_layers.float_modules is set, but method {method!r} is not quantized")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names) or len(set(names)) < len(names):
        raise ValueError(
            f"{path}: peft_layers.float_modules must be a list of distinct module names, got {names!r}"
        )
    if ours.get("version", 1) < 2:  # a reader of version 1 (or of no version) would quantize them
        raise ValueError(
            f"{path}: peft_layers.float_modules needs peft_layers.version 2, got {ours.get('version')!r}"
        )
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise ValueError(f"{path}: peft_layers.float_modules names {unknown}, which have no adapter in the file")
    return tuple(names)


