"""What a device can compute in, and the float dtypes a layer can hold."""

from __future__ import annotations

import functools

import torch

#: the float dtypes a layer can hold and compute in (float8 dtypes have no matmul nor promotion)
LAYER_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def is_layer_dtype(value: object) -> bool:
    """Whether ``value`` is one of :data:`LAYER_DTYPES`."""
    return isinstance(value, torch.dtype) and value in LAYER_DTYPES


def widest_float(device: torch.device) -> torch.dtype:
    """float64 where ``device`` computes in it, else float32: MPS has no float64, nor have Intel
    Arc XPUs (their properties say so, ``has_fp64``). Used for small sums and decompositions
    that must not lose digits (DoRA's factored norm, compose's SVD)."""
    if device.type == "mps":
        return torch.float32
    if device.type == "xpu":
        return _xpu_widest_float(device.index)
    return torch.float64


@functools.lru_cache(maxsize=None)
def _xpu_widest_float(index: int | None) -> torch.dtype:
    properties = torch.xpu.get_device_properties(index)
    return torch.float64 if getattr(properties, "has_fp64", True) else torch.float32
