"""Quantization backend: :class:`QuantizedLinear` over bitsandbytes and a pure-PyTorch NF4/FP4 codec.

See ``docs/quantization.md`` for the formats, the byte accounting and the CPU path choice.
"""

from .linear import BLOCKSIZES, QUANT_SCHEMES, QuantizedLinear
from .reference import (
    DOUBLE_QUANT_BLOCKSIZE,
    FP4_CODE,
    NF4_CODE,
    Quantized4bit,
    dequantize,
    dequantize_4bit,
    dequantize_blockwise,
    dequantize_int8_rowwise,
    dynamic_map,
    four_bit_code,
    pack_4bit,
    quantize,
    quantize_4bit,
    quantize_blockwise,
    quantize_int8_rowwise,
    unpack_4bit,
)

__all__ = [
    "BLOCKSIZES",
    "DOUBLE_QUANT_BLOCKSIZE",
    "FP4_CODE",
    "NF4_CODE",
    "QUANT_SCHEMES",
    "QuantizedLinear",
    "Quantized4bit",
    "dequantize",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dequantize_int8_rowwise",
    "dynamic_map",
    "four_bit_code",
    "pack_4bit",
    "quantize",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_int8_rowwise",
    "unpack_4bit",
]
