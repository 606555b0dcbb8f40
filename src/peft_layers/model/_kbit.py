"""Getting a (quantized) model ready for adapter training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..quant import QuantizedLinear
from ._methods import _check_model
from ._state import _is_packed_4bit
from ._tree import iter_adapter_layers


# ---- k-bit training --------------------------------------------------------------------------
def _input_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            return getter()
        except NotImplementedError:  # transformers models without token embeddings (ResNet, PatchTST)
            pass
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module
    return None


def _require_grad_hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
    return output.requires_grad_(True)


def prepare_for_kbit_training(
    model: nn.Module,
    gradient_checkpointing: bool = False,
    *,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Get a (quantized) model ready for adapter training, as Hugging Face PEFT's
    ``prepare_model_for_kbit_training`` does; returns ``model``.

    - freezes every parameter (the adapters injected afterwards are created trainable). On a
      model that has adapter layers already, ``requires_grad`` is left as it is: ``inject_adapters``
      froze everything but the adapter tensors and the biases its ``bias`` names;
    - casts every float16/bfloat16 parameter to float32, except bitsandbytes' packed 4-bit
      storage (``Params4bit``, which can be bf16 with ``quant_storage``) and the adapter tensors of
      adapter layers already in the model (left as they are). Half-precision parameters elsewhere
      would meet float32 activations (the norms' outputs, the adapters' updates) and fail or lose
      precision. Called before ``inject_adapters``, this makes a float32 copy of every dense
      layer, including the ones that ``method="qlora"``/``"qdora"`` quantize afterwards; called
      after, those layers are quantized already and only the rest is cast (the bias of a
      bitsandbytes layer that a QLoRA layer wraps is cast with it, so ``unload`` still gives that
      layer back);
    - makes the output of the input embeddings require grad (a forward hook), so that activation
      checkpointed blocks, whose inputs would otherwise not require grad, still backpropagate into
      the adapters inside them. Without an embedding layer, nothing is hooked.
    - with ``gradient_checkpointing=True``, calls the model's ``gradient_checkpointing_enable()``
      (``activation_checkpointing_enable()``, its name since transformers 5, where it has it)
      (Hugging Face models have it; for other models, and for a transformers model whose
      ``supports_gradient_checkpointing`` is False, it raises ``ValueError`` before anything is
      changed: wrap blocks with ``torch.utils.checkpoint.checkpoint`` yourself).
      ``gradient_checkpointing_kwargs`` go to that call, as in Hugging Face PEFT (e.g.
      ``{"use_reentrant": False}``, passed on to ``torch.utils.checkpoint.checkpoint``). Unlike
      Hugging Face PEFT, whose default turns checkpointing on for a model loaded in 4 or 8 bits,
      it is off unless asked.
    """
    _check_model(model)
    if not isinstance(gradient_checkpointing, bool):
        raise TypeError(f"gradient_checkpointing: expected a bool, got {gradient_checkpointing!r}")
    if gradient_checkpointing_kwargs is not None:
        if not isinstance(gradient_checkpointing_kwargs, dict):
            raise TypeError(
                f"gradient_checkpointing_kwargs: expected a dict or None, got {gradient_checkpointing_kwargs!r}"
            )
        if not gradient_checkpointing:
            raise ValueError(
                f"gradient_checkpointing_kwargs: {gradient_checkpointing_kwargs!r} given with "
                "gradient_checkpointing=False, where nothing would use them; pass gradient_checkpointing=True"
            )
    # transformers 5 renamed it activation_checkpointing_enable, and its kwargs argument with it
    # (the old name warns FutureWarning and calls it; the new one still calls a subclass's
    # override of the old one)
    enable = getattr(model, "activation_checkpointing_enable", None)
    kwargs_name = "activation_checkpointing_kwargs"
    if not callable(enable):
        enable = getattr(model, "gradient_checkpointing_enable", None)
        kwargs_name = "gradient_checkpointing_kwargs"
    if gradient_checkpointing and not callable(enable):
        raise ValueError(
            f"gradient_checkpointing: {type(model).__name__} has no gradient_checkpointing_enable() "
            "(nor activation_checkpointing_enable()); wrap its blocks with "
            "torch.utils.checkpoint.checkpoint instead"
        )
    # a transformers model that cannot checkpoint raises only inside enable(), after the changes
    if gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", True) is False:
        raise ValueError(
            f"gradient_checkpointing: {type(model).__name__} does not support it (its "
            "supports_gradient_checkpointing is False); pass gradient_checkpointing=False, or wrap "
            "its blocks with torch.utils.checkpoint.checkpoint yourself"
        )
    embeddings = _input_embeddings(model)  # before any change: a getter may raise
    adapter_tensors = {id(p) for _, layer in iter_adapter_layers(model) for p in layer.adapter_parameters()}
    if not adapter_tensors:
        model.requires_grad_(False)
    # the bitsandbytes modules that injected layers wrap (and unload gives back) are outside the
    # module tree: their biases get the cast of the layer's shared bias, which keeps them linked
    wrapped = [
        (layer, module) for layer in model.modules()
        if isinstance(layer, QuantizedLinear) and (module := layer.bnb_module) is not None
    ]
    for parameter in model.parameters():
        if (
            parameter.dtype in (torch.float16, torch.bfloat16)
            and not _is_packed_4bit(parameter)
            and id(parameter) not in adapter_tensors
        ):
            parameter.data = parameter.data.float()
    for layer, module in wrapped:
        if layer.bias is not None and module.bias is not None and module.bias.dtype != layer.bias.dtype:
            module.bias.data = layer.bias.data
    if embeddings is not None and not getattr(embeddings, "_peft_layers_grad_hook", False):
        embeddings.register_forward_hook(_require_grad_hook)
        setattr(embeddings, "_peft_layers_grad_hook", True)
    if gradient_checkpointing:
        if gradient_checkpointing_kwargs is None:
            cast(Callable[[], Any], enable)()
        else:
            cast(Callable[..., Any], enable)(**{kwargs_name: gradient_checkpointing_kwargs})
    return model
