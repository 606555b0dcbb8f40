"""peft_layers: parameter-efficient fine-tuning layers that replace ``nn.Linear`` in place.

LoRA, LoRA+, DoRA, QLoRA and QDoRA layers, the model surgery around them and a quantization
backend over bitsandbytes. See ``docs/`` for the user guide and the math.
"""

from . import compose, quant
from .adapter import AdapterMixin
from .dora import DoRALinear
# importing from the submodule binds it too: pl.io, left out of __all__, where a star import would
# shadow the standard library's io
from .io import load_adapter, save_adapter
from .lora import LoRALinear, LoRAPlusLinear
from .model import (
    adapter_state_dict,
    disable_adapters,
    inject_adapters,
    inject_lora,
    load_adapter_state_dict,
    merge_adapters,
    merge_and_unload,
    prepare_for_kbit_training,
    print_trainable_parameters,
    trainable_parameters,
    unload,
    unmerge_adapters,
)
from .modules_to_save import ModuleToSave
from .optim import create_loraplus_optimizer, loraplus_param_groups
from .qlora import QDoRALinear, QLoRALinear
from .serving import MultiLoRALinear, adapter_batch, set_adapter, stack_adapters

__version__ = "0.1.0"

__all__ = [
    "AdapterMixin",
    "DoRALinear",
    "LoRALinear",
    "LoRAPlusLinear",
    "ModuleToSave",
    "MultiLoRALinear",
    "QDoRALinear",
    "QLoRALinear",
    "adapter_batch",
    "adapter_state_dict",
    "compose",
    "create_loraplus_optimizer",
    "disable_adapters",
    "inject_adapters",
    "inject_lora",
    "load_adapter",
    "load_adapter_state_dict",
    "loraplus_param_groups",
    "merge_adapters",
    "merge_and_unload",
    "prepare_for_kbit_training",
    "print_trainable_parameters",
    "quant",
    "save_adapter",
    "set_adapter",
    "stack_adapters",
    "trainable_parameters",
    "unload",
    "unmerge_adapters",
]
