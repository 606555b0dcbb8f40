"""LoRA+ optimizer set-up (Hayou et al., 2024): ``B`` learns ``lr_ratio`` times faster than ``A``.

LoRA+ observes that with ``B = 0`` at init, equal learning rates for ``A`` and ``B`` are
inefficient for wide layers, and trains ``B`` at ``lr * lr_ratio`` (16 by default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._warnings import warn as _warn
from .lora import LoRAPlusLinear, _check_non_negative, _check_positive
from .model import iter_adapter_layers

# the public names (the rest is internal, underscore or not); docs/api.md lists them all
__all__ = [
    "DEFAULT_LR_RATIO",
    "create_loraplus_optimizer",
    "loraplus_param_groups",
]

DEFAULT_LR_RATIO = 16.0

#: the bitsandbytes optimizers whose embedding state create_loraplus_optimizer keeps in 32 bits
_BITSANDBYTES_8BIT_ADAMS = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    *,
    lr_ratio: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+ over every trainable parameter of ``model``.

    - ``lora_B`` of each adapter layer: ``lr * ratio``, with ``weight_decay``. ``ratio`` is the
      layer's own ``lr_ratio`` for a :class:`LoRAPlusLinear`, else ``lr_ratio``, else 16.
    - ``lora_A`` and other trainable matrices: ``lr``, with ``weight_decay``.
    - DoRA magnitudes, biases and other 1-D parameters (norm weights): ``lr``, no weight decay.

    Frozen parameters are left out. Empty groups are dropped. Each group has ``params``, ``lr``
    and ``weight_decay``, and a ``name`` saying what it holds.

    Raises ``ValueError`` for a model with no trainable parameters, or with no adapter layers
    (LoRA+ is about their ``lora_B``: without them the groups would fine-tune the whole model).
    """
    _check_positive("lr", lr)
    if lr_ratio is not None:
        _check_positive("lr_ratio", lr_ratio)
    _check_non_negative("weight_decay", weight_decay)
    default_ratio = float(lr_ratio) if lr_ratio is not None else DEFAULT_LR_RATIO

    b_by_ratio: dict[float, list[nn.Parameter]] = {}
    placed: set[int] = set()
    layers = list(iter_adapter_layers(model))
    for _, layer in layers:
        if not layer.lora_B.requires_grad or id(layer.lora_B) in placed:
            continue
        ratio = layer.lr_ratio if isinstance(layer, LoRAPlusLinear) else default_ratio
        b_by_ratio.setdefault(ratio, []).append(layer.lora_B)
        placed.add(id(layer.lora_B))
    own = sorted({layer.lr_ratio for _, layer in layers if isinstance(layer, LoRAPlusLinear)} - {default_ratio})
    if lr_ratio is not None and own:
        _warn(
            f"loraplus_param_groups(): lr_ratio={lr_ratio} applies to the plain LoRA layers only; the "
            f"LoRAPlusLinear layers keep their own lr_ratio ({', '.join(map(str, own))}). Set layer.lr_ratio "
            "to change theirs",
        )

    decayed: list[nn.Parameter] = []
    not_decayed: list[nn.Parameter] = []
    for parameter in model.parameters():
        if not parameter.requires_grad or id(parameter) in placed:
            continue
        (decayed if parameter.dim() >= 2 else not_decayed).append(parameter)

    groups = [
        {"name": "lora_A and other matrices", "params": decayed, "lr": lr, "weight_decay": weight_decay},
        {"name": "biases, norms, magnitudes", "params": not_decayed, "lr": lr, "weight_decay": 0.0},
    ]
    for ratio, params in b_by_ratio.items():
        groups.append(
            {"name": f"lora_B (lr x {ratio:g})", "params": params, "lr": lr * ratio, "weight_decay": weight_decay}
        )
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError("model: has no trainable parameters; inject_adapters() first")
    if not layers:
        # every trainable parameter would land in the lr groups: full fine-tuning, no LoRA+ at all
        raise ValueError(
            f"model: has no adapter layers (a {type(model).__name__} whose trainable parameters would all "
            "be fine-tuned in full, with no lora_B group); inject_adapters() first"
        )
    return groups


#: Hugging Face PEFT's names for create_loraplus_optimizer's arguments, and ours
_HF_LORAPLUS_ARGUMENTS = {
    "loraplus_lr_ratio": "lr_ratio= here",
    "loraplus_weight_decay": "weight_decay= here",
    # theirs is the learning rate of LoRA layers over embeddings, which peft_layers does not have
    "loraplus_lr_embedding": "for adapters on embeddings, which peft_layers does not have",
}


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: Callable[..., torch.optim.Optimizer],
    *,
    lr: float,
    lr_ratio: float | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer_cls(loraplus_param_groups(model, lr, ...), lr=lr, **kwargs)``.

    ``weight_decay`` in ``kwargs`` goes to the groups (not to biases, norms and magnitudes); the
    other keyword arguments go to the optimizer. Works with any ``torch.optim`` optimizer: an
    optimizer without weight decay simply ignores the groups' key. With a bitsandbytes 8-bit Adam
    (``Adam8bit``, ``AdamW8bit`` and their paged forms), ``nn.Embedding`` weights keep 32-bit
    optimizer state, as in Hugging Face PEFT. Raises as
    :func:`loraplus_param_groups` does (a model with no adapter layers included).
    """
    if not callable(optimizer_cls):
        raise TypeError(f"optimizer_cls: expected an optimizer class, got {optimizer_cls!r}")
    for theirs, ours in _HF_LORAPLUS_ARGUMENTS.items():
        if theirs in kwargs:  # else the optimizer's own "unexpected keyword argument" error
            raise TypeError(
                f"{theirs}: create_loraplus_optimizer takes no argument {theirs!r} (got "
                f"{theirs}={kwargs[theirs]!r}); Hugging Face PEFT's {theirs} is {ours}"
            )
    weight_decay = kwargs.pop("weight_decay", 0.0)
    groups = loraplus_param_groups(model, lr, lr_ratio=lr_ratio, weight_decay=weight_decay)
    optimizer = optimizer_cls(groups, lr=lr, **kwargs)
    if getattr(optimizer_cls, "__name__", None) in _BITSANDBYTES_8BIT_ADAMS:
        # 8-bit optimizer state is unstable for embeddings (bitsandbytes' StableEmbedding keeps
        # theirs in 32 bits): a trained embedding, e.g. a module to save, keeps 32-bit state, as
        # Hugging Face PEFT's create_loraplus_optimizer arranges
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
