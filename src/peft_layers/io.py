"""Adapter files in the Hugging Face PEFT layout: ``save_adapter`` and ``load_adapter``.

A saved adapter is a directory with two files:

- ``adapter_model.safetensors``: for every adapter layer at module path ``p``,
  ``base_model.model.<p>.lora_A.weight`` (r, in), ``base_model.model.<p>.lora_B.weight`` (out, r)
  and, for DoRA, ``base_model.model.<p>.lora_magnitude_vector`` (out,) (no ``.weight``). With a
  trained bias (``bias="all"``/``"adapter_only"``) also ``<p>.base_layer.bias`` for adapter layers
  and ``<q>.bias`` for other modules, as Hugging Face PEFT names them. Hugging Face PEFT also
  writes the full base weight ``<p>.base_layer.weight`` of a targeted embedding layer
  (``lm_head``, ``embed_tokens``); loading copies it into the base, as Hugging Face PEFT does
  (we never write it).
- ``adapter_config.json``: a Hugging Face ``LoraConfig`` (``peft_type: "LORA"``, ``r``,
  ``lora_alpha``, ``target_modules``, ``use_dora``, ``use_rslora``, ``rank_pattern``, ...). Layers
  whose rank or alpha differ from ``r``/``lora_alpha`` are listed in ``rank_pattern``/
  ``alpha_pattern`` under ``"^" + re.escape(path)``, which Hugging Face's pattern matching
  (``re.match(rf"(.*\\.)?({key})$", name)``) can only match to that one module. What a
  ``LoraConfig`` cannot say (LoRA+, a quantized base, a non-default DoRA epsilon) goes in our own
  field ``"peft_layers"``, a JSON object stored in the safetensors file's metadata, where Hugging
  Face PEFT does not look (in ``adapter_config.json`` its config loader would warn about an
  unknown key). Files that carry the field in the config instead are read too.

Several adapters share one directory tree the way Hugging Face PEFT lays them out: the adapter
named ``"default"`` (``adapter_name=None``) lives at the root, an adapter named ``"math"`` in
``<directory>/math/``.

A save is atomic per file and rolled back as a pair: both files are written to temporary files
in the target directory and fsynced, then renamed over the old ones; if the second rename fails
the first is undone. A load reads and checks everything (keys, shapes, ranks, dtypes, the config
against the tensors, the tensors against the model) before it changes the model; if adapters
have to be injected first and anything fails after that, the injection is undone.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._warnings import warn as _warn
from .adapter import base_features, is_conv1d
from .dora import DoRALinear
from .lora import LoRALinear, LoRAPlusLinear, is_bitsandbytes_module, ranks_above_features_allowed
from .modules_to_save import ModuleToSave
from .model import (
    METHODS,
    _adapter_layers_or_raise,
    _check_model,
    _inside_adapter,
    _stacked_layers,
    _suffix_matches,
    _undo_on_error,
    inject_adapters,
    iter_adapter_layers,
    iter_modules_to_save,
    method_of,
    pattern_key,
    _refuse_sharded,
)
from .quant import QuantizedLinear

WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_BIN_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
DEFAULT_ADAPTER = "default"
#: the prefix Hugging Face PEFT puts before every module path in the weights file
KEY_PREFIX = "base_model.model."
#: the safetensors metadata key of our field (a JSON object, as metadata values are strings)
METADATA_KEY = "peft_layers"
#: version of our ``"peft_layers"`` field
FORMAT_VERSION = 1

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
        saved_modules: module path -> the state dict of a module to save (``modules_to_save``:
            trained in full, see :class:`~peft_layers.ModuleToSave`), in file order.
        use_rslora, dropout, bias_mode (ours: "none", "all", "adapter_only"), init ("kaiming" for
        any start that leaves the base alone, or "pissa"), layer_kwargs (method-specific keyword
        arguments for the layer classes: ``epsilon``, ``lr_ratio``, ``quant``, ...).
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

    @property
    def is_dora(self) -> bool:
        """Whether the adapter is DoRA (it has magnitudes): ``method`` is "dora" or "qdora"."""
        return self.method in ("dora", "qdora")

    def state_dict(self) -> dict[str, Tensor]:
        """The adapter tensors under the keys of ``adapter_state_dict(model)``
        (``"<path>.lora_A"``, ``"<path>.lora_B"``, ``"<path>.magnitude"``, and
        ``"<path>.trained.<key>"`` for a module to save)."""
        state: dict[str, Tensor] = {}
        for path, module in self.modules.items():
            prefix = f"{path}." if path else ""
            state[prefix + "lora_A"] = module.lora_A
            state[prefix + "lora_B"] = module.lora_B
            if module.magnitude is not None:
                state[prefix + "magnitude"] = module.magnitude
        for path, saved in self.saved_modules.items():
            for key, tensor in saved.items():
                state[f"{path}.trained.{key}"] = tensor
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
    if not adapter_name or adapter_name in (".", "..") or any(s in adapter_name for s in separators):
        raise ValueError(
            f"adapter_name: expected a folder name (non-empty, no path separator, not '.' or '..'), "
            f"got {adapter_name!r}"
        )
    return adapter_name


def _check_directory(directory: Any) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a str or os.PathLike, got {type(directory).__name__}")
    path = Path(directory)
    if path.is_file():
        raise NotADirectoryError(
            f"directory: {str(path)!r} is a file; an adapter is a directory holding {WEIGHTS_NAME} and "
            f"{CONFIG_NAME} (pass the directory that holds them)"
        )
    return path


def adapter_directory(directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Where the adapter ``adapter_name`` lives under ``directory``: the root for ``None`` or
    ``"default"``, ``<directory>/<adapter_name>/`` otherwise (Hugging Face PEFT's layout)."""
    root = _check_directory(directory)
    name = _check_adapter_name(adapter_name)
    return root if name == DEFAULT_ADAPTER else root / name


def list_adapters(directory: str | os.PathLike) -> list[str]:
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
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a valid JSON adapter config ({error})") from None
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
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: tensor {key!r} holds NaN or infinite values")
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
    patterns = config.get(name) or {}
    if not isinstance(patterns, dict):
        raise ValueError(f"{path}: {name} must be an object of name pattern -> value, got {patterns!r}")
    for key, value in patterns.items():
        try:
            re.compile(key)
        except re.error as error:
            raise ValueError(f"{path}: {name} key {key!r} is not a valid regex ({error})") from None
        check(value, f"{name}[{key!r}]", path)
    return patterns


def _target_matches(target_modules: Any, name: str) -> bool:
    """Hugging Face PEFT's ``target_modules`` rule: a string is a regex that must match the whole
    name; a list holds exact names and name suffixes (whole dotted components)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(_suffix_matches(t, name) for t in target_modules)


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
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
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
    if method in ("qlora", "qdora"):
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
        if name not in _DTYPES:
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


def _split_key(key: str, path: Path) -> tuple[str, str]:
    """``"base_model.model.<p>.lora_A.weight"`` -> ``(p, "lora_A")``; likewise lora_B,
    magnitude, base_bias (``<p>.base_layer.bias``), base_weight (``<p>.base_layer.weight``) and
    bias (``<q>.bias``)."""
    if not key.startswith(KEY_PREFIX):
        raise ValueError(f"{path}: unexpected key {key!r}: keys start with {KEY_PREFIX!r} in this layout")
    rest = key[len(KEY_PREFIX):]
    for suffix, kind in _KEY_KINDS:
        if rest == suffix or rest.endswith("." + suffix):
            module = rest[: -len(suffix)].rstrip(".")
            if kind == "bias" and re.search(r"(^|\.)lora_[A-Za-z_]+$", module):
                break  # lora_B.bias and the like: a LoRA bias, which we do not support
            return module, kind
    raise ValueError(
        f"{path}: unexpected key {key!r}; this layout has <path>.lora_A.weight, <path>.lora_B.weight, "
        "<path>.lora_magnitude_vector, <path>.base_layer.weight (a targeted embedding's base weight) and, "
        "with trained biases, <path>.base_layer.bias / <path>.bias"
    )


def _saved_module_key(key: str, names: list[str], *, exact: bool) -> tuple[str, str] | None:
    """``"base_model.model.<p>.<k>"`` -> ``(p, k)`` when ``p`` is a module to save: the shortest
    dotted prefix of the key that is one of ``names`` (``exact``: the full names our field
    records) or ends with one (the config's ``modules_to_save``, matched as Hugging Face PEFT
    matches them: the module's name ends with the string). None for adapter keys and keys of
    other modules."""
    rest = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else None
    if not names or rest is None or rest.endswith(_ADAPTER_SUFFIXES):
        return None
    parts = rest.split(".")
    for end in range(1, len(parts)):
        path = ".".join(parts[:end])
        matches = (path in names) if exact else any(path.endswith(name) for name in names)
        if matches:
            return path, ".".join(parts[end:])
    return None


def _overlaps(path: str, other: str) -> bool:
    """Whether two module paths are one module or one lies inside the other."""
    return path == other or other.startswith(path + ".") or path.startswith(other + ".")


#: keys that Hugging Face PEFT's bias="all" writes from inside its modules-to-save wrapper: its
#: original module's bias and a second copy of the trained one (the module's own key has it)
_HF_WRAPPER_KEYS = ("original_module.", "modules_to_save.")


def read_adapter(directory: str | os.PathLike, *, adapter_name: str | None = None) -> AdapterFile:
    """Read and check an adapter saved by :func:`save_adapter` or by Hugging Face PEFT.

    Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (or, if there is none,
    ``adapter_model.bin`` through ``torch.load(weights_only=True)``) from
    :func:`adapter_directory` ``(directory, adapter_name)``. Checks that the config is a
    ``"LORA"`` config we can reproduce, that every key has the layout's form, that every module has
    ``lora_A`` (r, in) and ``lora_B`` (out, r) with matching ranks, a magnitude (out,) exactly
    when the config says DoRA, a rank equal to the config's (``r`` or its ``rank_pattern``), a
    full base weight ``<p>.base_layer.weight`` (Hugging Face PEFT writes it for targeted
    embedding layers) of shape (out, in), and that every tensor is floating point and finite.

    Raises ``FileNotFoundError`` if a file is missing and ``ValueError`` naming the file for
    anything else.
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
    if bias not in _BIAS_FROM_HF:
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
    ours, ours_path = _our_field(config, metadata, cp, weights_path)
    method, layer_kwargs = _parse_our_field(ours, use_dora, ours_path)
    # our field names the modules to save exactly where Hugging Face PEFT's suffix rule would take
    # more modules than were saved (see _build_files)
    exact_saved = isinstance(ours, dict) and "modules_to_save" in ours
    saved_names = (ours["modules_to_save"] if exact_saved else config.get("modules_to_save")) or []
    if not isinstance(saved_names, list) or not all(isinstance(name, str) and name for name in saved_names):
        where = f"{ours_path}: peft_layers." if exact_saved else f"{cp}: "
        raise ValueError(f"{where}modules_to_save must be a list of module names, got {saved_names!r}")
    if method == "lora_plus":
        layer_kwargs.setdefault("lr_ratio", _LORA_PLUS_RATIO)

    # group the tensors by module
    wp = weights_path
    grouped: dict[str, dict[str, Tensor]] = {}
    saved_modules: dict[str, dict[str, Tensor]] = {}
    velora = config.get("velora_config") not in (None, False, {})
    for key in sorted(tensors):  # safetensors hands keys back in no fixed order
        if velora and _VELORA_KEY.search(key):
            continue
        tensor = tensors[key]
        saved = _saved_module_key(key, saved_names, exact=exact_saved)
        if saved is not None:  # a module's own state: integer buffers (BatchNorm's count) too
            if not saved[1].startswith(_HF_WRAPPER_KEYS):
                saved_modules.setdefault(saved[0], {})[saved[1]] = tensor
            continue
        if not tensor.is_floating_point():
            raise ValueError(f"{wp}: tensor {key!r} has dtype {tensor.dtype}; adapter tensors are floating point")
        module, kind = _split_key(key, wp)
        grouped.setdefault(module, {})[kind] = tensor
    other_biases = {}
    modules: dict[str, ModuleAdapter] = {}
    for module, parts in grouped.items():
        if "lora_A" not in parts and "lora_B" not in parts:
            if set(parts) - {"bias"}:
                raise ValueError(f"{wp}: module {module!r} has {sorted(parts)} but no lora_A/lora_B")
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
        key = pattern_key(rank_pattern, module)
        rank = rank_pattern[key] if key is not None else r
        if a.shape[0] != rank:
            raise ValueError(
                f"{wp}: {module!r} has rank {a.shape[0]} but {cp.name} gives it rank {rank} "
                f"({'rank_pattern[' + repr(key) + ']' if key is not None else 'r'})"
            )
        key = pattern_key(alpha_pattern, module)
        alpha = float(alpha_pattern[key]) if key is not None else lora_alpha
        if target_modules is not None and not _target_matches(target_modules, module):
            raise ValueError(
                f"{wp}: module {module!r} is not matched by target_modules={target_modules!r} of {cp.name}"
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
        use_rslora=use_rslora, dropout=float(dropout), bias_mode=_BIAS_FROM_HF[bias], init=init,
        layer_kwargs=layer_kwargs, saved_modules=saved_modules,
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


def _quant_info(layer: LoRALinear) -> dict[str, Any]:
    """The quantization of a quantized layer's base (always a ``QuantizedLinear``: bitsandbytes
    layers are wrapped into one): ``scheme``, ``blocksize``, ``double_quant``, ``compute_dtype``."""
    base = layer.base_layer
    return {
        "scheme": base.scheme,
        "blocksize": base.blocksize,
        "double_quant": base.double_quant,
        "compute_dtype": _dtype_name(base.compute_dtype),
    }


def _uniform(layers: list[tuple[str, LoRALinear]], what: str, value_of) -> Any:
    values = {name: value_of(layer) for name, layer in layers}
    distinct = list(dict.fromkeys(map(repr, values.values())))
    if len(distinct) > 1:
        by_value: dict[str, list[str]] = {}
        for name, value in values.items():
            by_value.setdefault(repr(value), []).append(name)
        raise ValueError(
            f"save_adapter(): one adapter file holds one {what} for all layers, but the model mixes "
            f"{by_value}; save the groups as separate adapters"
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


def _plain_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters of ``model`` that are not inside an adapter layer or a module to save, under
    their first names."""
    holders = [*iter_adapter_layers(model), *iter_modules_to_save(model)]
    prefixes = tuple(f"{name}." for name, _ in holders)
    for name, parameter in model.named_parameters():
        if not name.startswith(prefixes):
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
    if any(n.endswith("." + p) for n in others for p in paths):
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


def _build_files(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any] | None]:
    """The tensors (Hugging Face keys), the config and our field (None when a ``LoraConfig`` says
    it all) of ``model``'s adapter."""
    layers = _adapter_layers_or_raise(model, "save_adapter()")  # checks that model is a module
    if any(name == "" for name, _ in layers):
        raise ValueError("save_adapter(): the model itself is an adapter layer; wrap it in a module first")
    method = _uniform(layers, "method", method_of)
    use_rslora = _uniform(layers, "use_rslora", lambda layer: layer.use_rslora)
    pissa = _uniform(layers, "init (pissa or not)", lambda layer: layer.init == "pissa")
    ours: dict[str, Any] = {}
    if method in ("dora", "qdora"):
        epsilon = _uniform(layers, "DoRA epsilon", lambda layer: layer.epsilon)
        if epsilon != _DORA_EPSILON:
            ours["epsilon"] = epsilon
    if method == "lora_plus":
        ours["lr_ratio"] = _uniform(layers, "LoRA+ lr_ratio", lambda layer: layer.lr_ratio)
    if method in ("qlora", "qdora"):
        ours["quant"] = _uniform(layers, "quantization", _quant_info)

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
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}

    config: dict[str, Any] = {
        "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": None,
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
    return tensors, config, {"version": FORMAT_VERSION, "method": method, **ours}


def _wider_saved_matches(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """Name of a module to save -> the other modules whose names end with it (Hugging Face PEFT
    would take them as modules to save too), named as the plain model names them (the modules
    inside a module to save included)."""
    inner = [
        f"{name}.{sub}" for name, saved in iter_modules_to_save(model)
        for sub, _ in saved.original.named_modules() if sub
    ]
    plain = [n for n in [*_plain_module_names(model), *inner] if n and n not in names]
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


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, adapter_name: str | None = None) -> Path:
    """Save ``model``'s adapter layers as a Hugging Face PEFT adapter; returns the folder.

    Writes ``adapter_model.safetensors`` and ``adapter_config.json`` to ``directory`` (created if
    missing) for ``adapter_name=None`` or ``"default"``, else to ``directory/<adapter_name>/``, the
    layout of Hugging Face PEFT's ``save_pretrained``. The files load in
    ``peft.PeftModel.from_pretrained(base, directory)`` and in :func:`load_adapter`.

    Each adapter layer is saved once, under its first module name. A layer shared under names
    that Hugging Face PEFT would not all adapt (``model.dec = model.enc``: it adapts ``enc`` only)
    gets a ``UserWarning`` naming them: the file computes something else there. The config's ``r`` and
    ``lora_alpha`` are the most common rank and alpha; other layers get ``rank_pattern``/
    ``alpha_pattern`` entries. Trained biases are saved when they train (``requires_grad``):
    those of the adapter layers (``bias="lora_only"``), or every bias (``bias="all"``).

    The save is atomic: both files are written to temporary files in the folder and fsynced, then
    renamed over the old ones (a failed second rename undoes the first). On any error, the files
    that were in the folder before are still there, unchanged. Raises ``ValueError`` if the model has no adapter
    layers, or if its layers mix what one file cannot hold (methods, use_rslora, quantization,
    DoRA epsilon, LoRA+ ratio, PiSSA and non-PiSSA).
    """
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
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(folder, files)
    _warn_shared(model, "save_adapter()", f"the file {str(folder)!r}")
    return folder


# ---- loading -----------------------------------------------------------------------------------
@dataclass
class _FillPlan:
    """What a load will copy: checked completely before anything is copied."""

    layers: list[tuple[LoRALinear, ModuleAdapter]]
    biases: list[tuple[Tensor, Tensor]]
    saved: list[tuple[ModuleToSave, dict[str, Tensor]]] = field(default_factory=list)


def _is_quantized(module: nn.Module | None) -> bool:
    return module is not None and (is_bitsandbytes_module(module) or isinstance(module, QuantizedLinear))


def _check_base_weight(where: str, module: ModuleAdapter, base: nn.Module, method: str) -> None:
    """The file's full base weight (if any) can be copied into ``base``, the linear layer the
    adapter wraps (``method`` is the adapter layer's): a float weight of the same shape."""
    if module.base_weight is None:
        return
    if method in ("qlora", "qdora") or _is_quantized(base):
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


def _check_module_to_save(where: str, model: nn.Module, path: str, module: nn.Module | None) -> None:
    """``module`` (at ``path``) can become a module to save: it exists and is plain."""
    if module is None or not path:
        raise ValueError(f"{where}: the file has a module to save there, but the model has no module of that name")
    if isinstance(module, (LoRALinear, ModuleToSave)) or _inside_adapter(model, path):
        raise ValueError(f"{where}: a module to save in the file, but an adapter layer or inside one in the model")
    if any(_is_quantized(inner) for inner in module.modules()):
        raise ValueError(f"{where}: a module to save in the file, which the model holds quantized (it cannot train in full)")


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
    return _FillPlan(list(planned.values()), _plan_other_biases(model, adapter), _plan_saved_modules(model, adapter))


def _apply(plan: _FillPlan, adapter: AdapterFile) -> None:
    with torch.no_grad():
        for layer, module in plan.layers:
            layer.lora_A.copy_(module.lora_A)
            layer.lora_B.copy_(module.lora_B)
            if module.magnitude is not None:
                layer.magnitude.copy_(module.magnitude)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
            if module.base_weight is not None:
                # a weight tied to another module (lm_head and embed_tokens) changes there too, as in
                # Hugging Face PEFT, whose load_state_dict copies into the same tensor
                layer.base_layer.weight.copy_(module.base_weight)
            layer.alpha = module.alpha
            layer.use_rslora = adapter.use_rslora
            if isinstance(layer, DoRALinear) and "epsilon" in adapter.layer_kwargs:
                layer.epsilon = adapter.layer_kwargs["epsilon"]
            if isinstance(layer, LoRAPlusLinear) and "lr_ratio" in adapter.layer_kwargs:
                layer.lr_ratio = adapter.layer_kwargs["lr_ratio"]
        for bias, tensor in plan.biases:
            bias.copy_(tensor)
    for saved, state in plan.saved:
        saved.trained.load_state_dict(state)


_FROM_FILE = ("targets", "rank", "alpha", "rank_pattern", "alpha_pattern", "use_rslora", "init")
_QUANT_KWARGS = ("quant", "blocksize", "double_quant", "compute_dtype")


def _inject_kwargs(
    adapter: AdapterFile, method: str, overrides: dict[str, Any], aliases: dict[str, list[str]]
) -> dict[str, Any]:
    """``inject_adapters`` keyword arguments that rebuild the file's layers (ranks, alphas, ...).

    ``aliases[path]`` lists every name of the module at ``path``; ``inject_adapters`` looks up a
    shared module's rank under its first name, which need not be the one in the file."""
    ranks = [m.rank for m in adapter.modules.values()]
    alphas = [m.alpha for m in adapter.modules.values()]
    r, alpha = _most_common(ranks), _most_common(alphas)
    kwargs: dict[str, Any] = {
        "rank": r,
        "alpha": alpha,
        "rank_pattern": {
            _anchored(a): m.rank for p, m in adapter.modules.items() if m.rank != r for a in aliases[p]
        },
        "alpha_pattern": {
            _anchored(a): m.alpha for p, m in adapter.modules.items() if m.alpha != alpha for a in aliases[p]
        },
        "use_rslora": adapter.use_rslora,
        "init": adapter.init,
        "dropout": adapter.dropout,
        "bias": adapter.bias_mode,
    }
    for key, value in adapter.layer_kwargs.items():
        if (
            (key == "epsilon" and method in ("dora", "qdora"))
            or (key == "lr_ratio" and method == "lora_plus")
            or (key in _QUANT_KWARGS and method in ("qlora", "qdora"))
        ):
            kwargs[key] = value
    kwargs.update(overrides)
    return kwargs


def _inject_and_fill(model: nn.Module, adapter: AdapterFile, inject_kwargs: dict[str, Any]) -> None:
    given = sorted(set(inject_kwargs) & set(_FROM_FILE))
    if given:
        raise TypeError(f"load_adapter(): {given} come from the adapter file and cannot be passed")
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
    quantized = [p for p in adapter.modules if _is_quantized(modules.get(p) if p else None)]
    if "method" not in inject_kwargs and method in ("lora", "dora") and quantized == list(adapter.modules):
        # a Hugging Face file says nothing of quantization: over a model loaded in 4/8 bits (its
        # targets are bitsandbytes or QuantizedLinear layers) its adapter is QLoRA/QDoRA
        method = "q" + method
    for path, module in adapter.modules.items():
        target = modules.get(path) if path else None
        if target is None:
            raise ValueError(
                f"{adapter.directory}: the file has an adapter for {path!r}, but the model has no module "
                "of that name"
            )
        _refuse_meta(f"{adapter.directory}: {path!r}", [*target.parameters(), *target.buffers()])
        _refuse_sharded(target.parameters(), f"load_adapter(): {path!r}")
        if _is_quantized(target) and method not in ("qlora", "qdora"):
            raise ValueError(
                f"{adapter.directory}: {path!r} is a quantized {type(target).__name__}, which method "
                f"{method!r} cannot wrap; load with method='qlora' (or 'qdora' for DoRA)"
            )
        if is_conv1d(target) and method in ("qlora", "qdora"):
            raise ValueError(
                f"{adapter.directory}: {path!r} is a transformers Conv1D, which method {method!r} cannot "
                f"quantize; load with method={method[1:]!r} (the adapter is the same on a float base)"
            )
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
    for path, state in adapter.saved_modules.items():
        where = f"{adapter.directory}: module to save {path!r}"
        _check_module_to_save(where, model, path, modules.get(path))
        _check_saved_state(where, modules[path], state)
        _refuse_meta(where, list(modules[path].state_dict().values()))
    aliases = {p: [n for n, m in modules.items() if m is modules[p]] for p in adapter.modules}
    kwargs = _inject_kwargs(adapter, method, overrides, aliases)
    paths, saved_paths = set(adapter.modules), set(adapter.saved_modules)
    if saved_paths:
        kwargs["modules_to_save"] = lambda name, module: name in saved_paths
    touched = [modules[p] for p in [*paths, *saved_paths]]
    # injecting freezes the targets (PiSSA rewrites their weights); a failure undoes it all
    with _undo_on_error(model, touched, values=adapter.init == "pissa"):
        # the file overwrites the fresh A, B: don't let their initialisation move the caller's RNG
        with torch.random.fork_rng(devices=[]), ranks_above_features_allowed():
            inject_adapters(model, lambda name, module: name in paths, method=method, **kwargs)
        _apply(_plan_fill(model, adapter), adapter)


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
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
      layers. The layers take the file's ``alpha`` and ``use_rslora`` (they define the function);
      dropout and the base are left as they are (but for a base weight or bias the file holds).
      ``inject_kwargs`` are not allowed then.
    - If ``model`` has no adapter layers, the file's modules are wrapped first with
      ``inject_adapters``: the method from the file (``use_dora`` -> ``"dora"``, or our
      ``"peft_layers"`` field: ``"lora_plus"``, ``"qlora"``, ``"qdora"`` with the recorded
      quantization), each module with its rank and alpha, the file's ``use_rslora``,
      ``lora_dropout`` and ``bias`` mode. ``inject_kwargs`` (``method``, ``quant``, ``dropout``,
      ``bias``, ``compute_dtype``, ...) override these, except what the file fixes (targets,
      ranks, alphas, ``use_rslora``, ``init``). ``init_lora_weights="pissa"`` re-creates the PiSSA
      residual of the base as Hugging Face PEFT does. The caller's RNG is not advanced.

    A file holding a targeted layer's full base weight (``<p>.base_layer.weight``, which Hugging
    Face PEFT's ``save_pretrained`` writes for ``lm_head`` and other embedding layers) has it
    copied into the base weight, as Hugging Face PEFT does (a tied weight changes under both its
    names); a quantized base refuses it. A shared module whose other names Hugging Face PEFT would
    leave plain (it adapts the first name only) gives a ``UserWarning`` naming them.

    Everything is checked before the model changes; on any error the model is as it was (an
    injection is undone). Returns ``model``.

    Raises:
        FileNotFoundError: the adapter folder or its files do not exist.
        ValueError: bad files (JSON, truncated or corrupt weights, keys, shapes, ranks, dtypes,
            config against tensors) or files that do not fit the model.
        TypeError: a bad argument type, or ``inject_kwargs`` with a model that has adapters.
    """
    _check_model(model)
    adapter = read_adapter(directory, adapter_name=adapter_name)
    if next(iter_adapter_layers(model), None) is not None:
        if inject_kwargs:
            raise TypeError(
                f"load_adapter(): {sorted(inject_kwargs)} apply only when the model has no adapter layers "
                "(the file's adapters are injected then); this model has adapter layers, which the file fills"
            )
        _apply(_plan_fill(model, adapter), adapter)
    elif _stacked_layers(model):
        raise ValueError(
            "load_adapter(): the model's adapters are stacked for serving (stack_adapters()); "
            f"stack_adapters(model, {{name: {str(adapter.directory)!r}}}) adds this one beside them, "
            "unload(model) takes the stacks off first"
        )
    else:
        _inject_and_fill(model, adapter, inject_kwargs)
    _warn_shared(model, "load_adapter()", f"the file {str(adapter.directory)!r}")
    return model
