"""Model surgery: put adapter layers into a model, take them out, merge, count, freeze.

``inject_adapters(model, targets, method=...)`` replaces the matching linear layers of ``model`` in
place with adapter layers that wrap them (no weight is copied). Everything else is frozen. The
functions here only walk the module tree and swap modules; the math lives in the layers.

Names are the dotted paths of ``model.named_modules()`` ("layers.0.attn.q_proj"). A module that
is reachable under several names (a shared module) gets one adapter, installed under every name.

The package's modules: ``_methods`` (the methods and which layers each wraps), ``_tree`` (name
matching, "all-linear", swapping modules), ``_inject`` (``inject_adapters``), ``_merge`` (merge,
unload, disable), ``_state`` (counting, adapter state dicts), ``_kbit``
(``prepare_for_kbit_training``).
"""

from __future__ import annotations

# in reading order: each module builds on the ones above it
from ._methods import (
    ALL_LINEAR,
    BIAS_MODES,
    FLOAT_METHOD,
    METHODS,
    QUANTIZED_METHOD,
    TargetSpec,
    is_quantized_linear,
    loaded_quantized,
    method_class,
    method_of,
)
from ._tree import iter_adapter_layers, iter_modules_to_save, pattern_key, unwrapped
from ._inject import inject_adapters, inject_lora
from ._merge import disable_adapters, merge_adapters, merge_and_unload, unload, unmerge_adapters
from ._state import (
    adapter_state_dict,
    load_adapter_state_dict,
    print_trainable_parameters,
    trainable_parameters,
)
from ._kbit import _require_grad_hook, prepare_for_kbit_training

# prepare_for_kbit_training's hook stays on the embeddings of a torch.save'd model, named by its
# module path: kept at peft_layers.model, where models saved before the split find it
_require_grad_hook.__module__ = __name__

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
