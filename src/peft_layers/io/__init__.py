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

The package has three parts: ``_format`` (what a file holds, and reading it alone), ``_save``
(writing a model's adapters) and ``_load`` (fitting a file to a model and filling it).
"""

from ._format import (
    CONFIG_NAME,
    DEFAULT_ADAPTER,
    FORMAT_VERSION,
    KEY_PREFIX,
    METADATA_KEY,
    WEIGHTS_BIN_NAME,
    WEIGHTS_NAME,
    AdapterFile,
    ModuleAdapter,
    adapter_directory,
    list_adapters,
    read_adapter,
)
from ._load import load_adapter
from ._save import save_adapter

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_ADAPTER",
    "FORMAT_VERSION",
    "KEY_PREFIX",
    "METADATA_KEY",
    "WEIGHTS_BIN_NAME",
    "WEIGHTS_NAME",
    "AdapterFile",
    "ModuleAdapter",
    "adapter_directory",
    "list_adapters",
    "load_adapter",
    "read_adapter",
    "save_adapter",
]
