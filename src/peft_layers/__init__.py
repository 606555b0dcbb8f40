"""peft_layers: parameter-efficient fine-tuning layers that replace ``nn.Linear`` in place.

LoRA, LoRA+, DoRA, QLoRA and QDoRA layers, the model surgery around them and a quantization
backend over bitsandbytes. See ``docs/`` for the user guide and the math.
"""

from .adapter import AdapterMixin
from .dora import DoRALinear
from .lora import LoRALinear, LoRAPlusLinear

__version__ = "0.1.0"

__all__ = [
    "AdapterMixin",
    "DoRALinear",
    "LoRALinear",
    "LoRAPlusLinear",
]
