"""A pure-PyTorch NF4/FP4 codec that agrees bit for bit with bitsandbytes on the CPU.

No bitsandbytes import: this module is what :class:`~peft_layers.quant.QuantizedLinear` falls back
to when bitsandbytes cannot be imported, and the second implementation the tests hold
bitsandbytes against.

The format (bitsandbytes' ``quantize_4bit`` with ``compress_statistics``):

- The weight ``w`` is flattened (row-major) and cut into blocks of ``blocksize`` values; the last
  block may be short. Each block ``k`` keeps ``absmax_k = max |w_i|`` and every value becomes the
  index of the nearest of 16 levels ``c_j`` (``NF4_CODE`` or ``FP4_CODE``) to ``w_i / absmax_k``::

      q_i = argmin_j |w_i / absmax_k - c_j|,        w_i ~ c[q_i] * absmax_k

- Two 4-bit indices share a byte, the even-positioned value in the high nibble:
  ``byte_m = (q_{2m} << 4) | q_{2m+1}`` (an odd count is padded with the index of 0.0).
- Double quantization stores the float32 ``absmax`` as 8 bits: subtract the mean ``offset``, cut
  into blocks of 256, keep each block's ``nested_absmax`` and quantize ``(absmax - offset) /
  nested_absmax`` to the nearest-ish entry of the 256-entry dynamic map (:func:`dynamic_map`)::

      absmax_k ~ dynamic_map[qa_k] * nested_absmax[k // 256] + offset

Rounding follows bitsandbytes exactly, quirks included (see :func:`quantize_4bit` and
:func:`quantize_blockwise`), because the point of this module is bit-exact agreement.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from .._devices import LAYER_DTYPES, is_layer_dtype

__all__ = [
    "DOUBLE_QUANT_BLOCKSIZE",
    "FP4_CODE",
    "NF4_CODE",
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

#: block size of the second (8-bit) quantization of the absmax values
DOUBLE_QUANT_BLOCKSIZE = 256

# The 16 NormalFloat levels of the QLoRA paper (Dettmers et al., 2023): quantiles of N(0, 1) with
# equal mass per bin, an exact zero, normalised to [-1, 1]. These are bitsandbytes' float32 values.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
    device="cpu",  # not the default device: an import under `torch.set_default_device` included
)

# FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2) in bit-pattern order: index j has sign
# bit j >> 3 and magnitude bits j & 7 -> 0, 0.0625, 8, 12, 4, 6, 2, 3; divided by 12 in float32.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_CODE = torch.tensor(
    _FP4_MAGNITUDES + tuple(-m for m in _FP4_MAGNITUDES), dtype=torch.float32, device="cpu"
)
FP4_CODE = FP4_CODE / FP4_CODE.abs().max()

# Quantization sorts the levels and rounds to the nearest; FP4 holds both +0 (index 0) and -0
# (index 8). bitsandbytes' order puts index 0 before index 8, so a scaled value in
# (-0.0026, 0] gets index 0 and one in (0, 0.0026] gets index 8 (-0.0). We keep that order.
_FP4_SORTED_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)

_FOUR_BIT_TYPES = ("nf4", "fp4")


def four_bit_code(quant_type: str) -> Tensor:
    """The 16 float32 levels ``c_j`` of ``quant_type`` ("nf4" or "fp4"), indexed by the 4-bit code."""
    if quant_type == "nf4":
        return NF4_CODE.clone()
    if quant_type == "fp4":
        return FP4_CODE.clone()
    raise ValueError(f"quant_type: expected one of {_FOUR_BIT_TYPES}, got {quant_type!r}")


def _sorted_levels(quant_type: str) -> tuple[Tensor, Tensor]:
    """(midpoints between adjacent sorted levels, code index of each sorted level)."""
    code = four_bit_code(quant_type)
    if quant_type == "nf4":
        order = torch.arange(16, device="cpu")
    else:
        order = torch.tensor(_FP4_SORTED_ORDER, device="cpu")
    levels = code[order]
    return (levels[:-1] + levels[1:]) / 2, order


@functools.lru_cache(maxsize=None)
def _code_on(quant_type: str, device: torch.device) -> Tensor:
    """The 16 levels on ``device``, copied there once: a copy per call from the host would wait
    for the GPU (a synchronising host-to-device copy) on every decode. Never an inference tensor,
    whichever mode the first call runs in."""
    with torch.inference_mode(False):
        return four_bit_code(quant_type).to(device)


# the CPU's copies made now, not on a first decode: torch.jit.trace would record that first call's
# copy as ops and later calls' cached tensor as a constant, and its re-trace check then fails
for _quant_type in _FOUR_BIT_TYPES:
    _code_on(_quant_type, torch.device("cpu"))


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """The dynamic 8-bit quantization map of Dettmers (2016), as bitsandbytes builds it.

    For each exponent ``e = 0 .. max_exponent_bits - 1`` the map holds ``10^(e - max_exponent_bits
    + 1) * m`` for the midpoints ``m`` of ``2^k + 1`` evenly spaced points on [0.1, 1], with
    ``k = e + total_bits - 1 - max_exponent_bits`` (one more when unsigned), with both signs when
    ``signed``; then 0 and 1. Those must be exactly ``2^total_bits`` values (``ValueError``
    otherwise); the map is padded with zeros to 256 entries (the table size bitsandbytes' kernels
    read) and sorted. Values are computed in float32 exactly as bitsandbytes does, so the map is
    bit-identical to ``bitsandbytes.functional.create_dynamic_map``.
    """
    values: list[float] = []
    non_sign_bits = total_bits - 1
    extra_items = 2 ** (non_sign_bits - max_exponent_bits) - 1

    def level(exponent: int, count: int) -> None:
        points = torch.linspace(0.1, 1, count, dtype=torch.float32, device="cpu")
        midpoints = (points[:-1] + points[1:]) / 2.0
        scale = 10 ** (exponent - max_exponent_bits + 1)
        values.extend((scale * midpoints).tolist())
        if signed:
            values.extend((-scale * midpoints).tolist())

    for exponent in range(max_exponent_bits):
        shift = exponent + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        level(exponent, int(2**shift + 1))
    if extra_items > 0:
        level(max_exponent_bits - 1, extra_items + 1)
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:
        raise ValueError(
            f"dynamic_map: signed={signed}, max_exponent_bits={max_exponent_bits}, "
            f"total_bits={total_bits} give {len(values)} values, not {2**total_bits}"
        )
    values += [0.0] * (256 - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32, device="cpu")


# ---- input checks -----------------------------------------------------------------------------
# Shapes, counts and dtypes only (metadata): the dequantize functions run on every forward of a
# QuantizedLinear without bitsandbytes, so they make no pass over the data. The quantize functions
# (not per step) also refuse NaN and inf, which would otherwise store garbage codes.
def _check_tensor(value: object, argument: str, what: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{argument}: expected {what}, got {type(value).__name__}")


def _check_float_input(value: Tensor, argument: str) -> None:
    """A floating-point tensor of finite values (what the quantize functions take)."""
    _check_tensor(value, argument, "a floating-point tensor")
    if not value.is_floating_point():
        raise TypeError(f"{argument}: expected a floating-point tensor, got dtype {value.dtype}")
    if not value.is_meta and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{argument}: expected finite values, got NaN or inf")


def _check_float_statistics(absmax: object, count: int, argument: str, what: Callable[[], str]) -> None:
    """``count`` floating-point values (one per block or row); ``what()`` says what they are (a
    callable, so that the message costs nothing on the hot path when all is well)."""
    if not isinstance(absmax, Tensor) or not absmax.is_floating_point():
        got = f"dtype {absmax.dtype}" if isinstance(absmax, Tensor) else type(absmax).__name__
        raise TypeError(f"{argument}: expected a floating-point tensor of {count} values ({what()}), got {got}")
    if absmax.numel() != count:
        raise ValueError(f"{argument}: expected {count} values ({what()}), got {absmax.numel()}")


def _check_float_dtype(dtype: object) -> None:
    if not is_layer_dtype(dtype):
        raise TypeError(f"dtype: expected one of {LAYER_DTYPES}, got {dtype!r}")


def _check_code(code: Tensor) -> None:
    _check_tensor(code, "code", "a tensor of 256 values")
    if code.shape != (256,):
        raise ValueError(f"code: expected 256 values (a 1-D 8-bit map), got shape {tuple(code.shape)}")


# ---- packing --------------------------------------------------------------------------------
def pack_4bit(codes: Tensor) -> Tensor:
    """Pack 4-bit codes (any shape, values 0..15) two per byte, the first in the high nibble.

    Returns a uint8 tensor of shape ``(ceil(n / 2), 1)``, bitsandbytes' ``Params4bit`` layout; an
    odd count is padded with code 0. ``codes`` must be an integer tensor with values in 0..15
    (``TypeError``/``ValueError`` otherwise).
    """
    _check_tensor(codes, "codes", "an integer tensor of 4-bit codes (0..15)")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes: expected an integer tensor of 4-bit codes (0..15), got dtype {codes.dtype}")
    if codes.numel() and not codes.is_meta:
        low, high = torch.aminmax(codes.reshape(-1))
        if low.item() < 0 or high.item() > 15:
            raise ValueError(f"codes: expected values in 0..15, got values from {low.item()} to {high.item()}")
    return _pack_4bit(codes)


def _pack_4bit(codes: Tensor) -> Tensor:
    """:func:`pack_4bit` without its checks, for codes this module computed."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return ((flat[0::2] << 4) | flat[1::2]).unsqueeze(1)


def unpack_4bit(packed: Tensor, numel: int) -> Tensor:
    """The first ``numel`` 4-bit codes of a packed tensor (inverse of :func:`pack_4bit`), as int64.

    ``numel`` is at most twice the bytes ``packed`` holds (``ValueError`` otherwise)."""
    _check_tensor(packed, "packed", "a tensor of packed 4-bit codes")
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel: expected an int >= 0, got {numel!r}")
    if numel > 2 * flat.numel():
        raise ValueError(
            f"numel: expected at most {2 * flat.numel()} (two codes per byte; packed holds "
            f"{flat.numel()} bytes), got {numel}"
        )
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return codes[:numel].long()


# ---- blockwise 4-bit ------------------------------------------------------------------------
def _blocks(numel: int, blocksize: int) -> tuple[int, int]:
    """(number of blocks, length of the last block)."""
    n_blocks = -(-numel // blocksize)
    tail = numel - (n_blocks - 1) * blocksize
    return n_blocks, tail


def _check_blocksize(blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2:
        raise ValueError(f"blocksize: expected an int >= 2, got {blocksize!r}")


def _block_absmax(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(values zero-padded to whole blocks as (blocks, blocksize), absmax per block)."""
    n_blocks, _ = _blocks(flat.numel(), blocksize)
    padded = torch.zeros(n_blocks * blocksize, dtype=flat.dtype, device=flat.device)
    padded[: flat.numel()] = flat
    padded = padded.view(n_blocks, blocksize)
    return padded, padded.abs().amax(dim=1)


def quantize_4bit(weight: Tensor, quant_type: str = "nf4", blocksize: int = 64) -> tuple[Tensor, Tensor]:
    """Blockwise absmax 4-bit quantization: ``(packed codes, float32 absmax per block)``.

    ``weight`` (any shape, float16/bfloat16/float32) is read as float32 and flattened row-major.
    Scaling and rounding reproduce bitsandbytes' CPU kernel bit for bit:

    - a full block is scaled by the float32 reciprocal, ``w * (1 / max(absmax, 1e-38))``; the short
      last block (if any) is divided, ``w / max(absmax, 1e-38)``, and stores that clamped absmax
      (a full block stores its own, 0 included); the result is clamped to [-1, 1];
    - a scaled value ``x`` gets the sorted level ``k`` with ``mid_{k-1} < x <= mid_k`` (midpoints
      ``mid`` of adjacent sorted levels, float32): a value exactly halfway goes to the lower level.

    ``packed`` is uint8 of shape ``(ceil(n / 2), 1)`` (see :func:`pack_4bit`). A ``weight`` that
    is not a floating-point tensor, or holds NaN or inf, raises ``TypeError``/``ValueError``.
    """
    _check_blocksize(blocksize)
    midpoints, order = _sorted_levels(quant_type)
    _check_float_input(weight, "weight")
    flat = weight.detach().reshape(-1).float()
    numel = flat.numel()
    padded, absmax = _block_absmax(flat, blocksize)
    safe = absmax.clamp(min=1e-38)
    scaled = padded * (1.0 / safe).unsqueeze(1)
    _, tail = _blocks(numel, blocksize)
    if tail != blocksize:
        scaled[-1] = padded[-1] / safe[-1]
        absmax[-1] = safe[-1]  # bitsandbytes stores the short block's clamped absmax
    scaled = scaled.clamp_(-1.0, 1.0).reshape(-1)[:numel]
    sorted_index = torch.bucketize(scaled, midpoints.to(scaled.device), right=False)
    codes = order.to(scaled.device)[sorted_index]
    if numel % 2:  # the padding nibble is the code of 0.0, as bitsandbytes pads with a scaled 0
        zero = order[torch.bucketize(torch.zeros(1, device="cpu"), midpoints)].to(codes.device)
        codes = torch.cat([codes, zero])
    return _pack_4bit(codes), absmax


def dequantize_4bit(
    packed: Tensor,
    absmax: Tensor,
    shape: tuple[int, ...] | torch.Size,
    quant_type: str = "nf4",
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``w_i = c[q_i] * absmax[i // blocksize]`` (one float32 product), as ``shape`` in ``dtype``.

    ``packed`` must hold ``ceil(n / 2)`` bytes and ``absmax`` one floating-point value per block
    for the ``n`` values of ``shape`` (``ValueError``/``TypeError`` otherwise; only sizes are
    checked, not the values).
    """
    _check_blocksize(blocksize)
    if not isinstance(shape, (tuple, list)) or any(
        type(size) is not int or size < 0 for size in shape  # bool is not a size
    ):
        raise ValueError(f"shape: expected a tuple of ints >= 0, got {shape!r}")
    _check_float_dtype(dtype)
    numel = math.prod(shape)
    _check_tensor(packed, "packed", "a tensor of packed 4-bit codes")
    raw = packed.reshape(-1)
    if raw.dtype != torch.uint8:
        raw = raw.view(torch.uint8)
    if raw.numel() != (numel + 1) // 2:
        raise ValueError(
            f"packed: expected {(numel + 1) // 2} bytes (two codes per byte) for shape {tuple(shape)}, "
            f"got {raw.numel()}"
        )
    n_blocks, _ = _blocks(numel, blocksize)
    _check_float_statistics(
        absmax, n_blocks, "absmax", lambda: f"one per block of {blocksize} for shape {tuple(shape)}"
    )
    code = _code_on(quant_type, packed.device)
    # one lookup per byte: the 256 possible bytes decode to (code[high], code[low])
    byte_values = torch.arange(256, device=packed.device)
    pairs = torch.stack([code[byte_values >> 4], code[byte_values & 0xF]], dim=1)
    values = pairs.index_select(0, raw.int()).reshape(-1)
    if values.numel() != n_blocks * blocksize:
        padded = values.new_zeros(n_blocks * blocksize)
        padded[:numel] = values[:numel]
        values = padded
    out = values.view(n_blocks, blocksize).mul_(absmax.float().view(-1, 1)).reshape(-1)[:numel]
    return out.reshape(shape).to(dtype)


# ---- blockwise 8-bit with the dynamic map (the double quantization of absmax) ---------------
_LUT_SIZE = 65536


def _lookup_table(code: Tensor) -> Tensor:
    """bitsandbytes' CPU 8-bit quantizer rounds through a 65536-entry table over [-1, 1].

    Grid point ``g_i = -1 + 2 i / 65535`` (float32) maps to the number of code midpoints strictly
    below it, i.e. the first code whose upper midpoint is >= ``g_i``.
    """
    midpoints = (code[:-1] + code[1:]) * 0.5
    grid = torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device) * 2.0 / (_LUT_SIZE - 1) - 1.0
    return torch.searchsorted(midpoints, grid, side="left").to(torch.uint8)


def quantize_blockwise(
    values: Tensor, code: Tensor | None = None, blocksize: int = DOUBLE_QUANT_BLOCKSIZE
) -> tuple[Tensor, Tensor]:
    """8-bit blockwise quantization against a sorted 256-entry ``code``: ``(uint8 indices, absmax)``.

    Matches bitsandbytes' CPU kernel bit for bit, which is not exact nearest rounding: each block's
    values are scaled by the float32 reciprocal of their absmax, clamped to [-1, 1], mapped to a
    grid index ``trunc(((x + 1) * 0.5) * 65535 + 0.5)`` (each step rounded to float32) and looked up
    in :func:`_lookup_table`. A block whose absmax is 0 stores index 0. NaNs do not enter absmax;
    an infinite value gives an infinite absmax, as in bitsandbytes.
    ``code`` defaults to :func:`dynamic_map`; a given one must hold 256 values.
    """
    _check_blocksize(blocksize)
    _check_tensor(values, "values", "a floating-point tensor")
    if not values.is_floating_point():
        raise TypeError(f"values: expected a floating-point tensor, got dtype {values.dtype}")
    if code is None:
        code = dynamic_map()
    _check_code(code)
    code = code.to(device=values.device, dtype=torch.float32)
    flat = values.detach().reshape(-1).float()
    numel = flat.numel()
    padded, _ = _block_absmax(flat, blocksize)
    # only NaN is kept out of absmax: nan_to_num would also clamp +-inf to +-FLT_MAX, where
    # bitsandbytes keeps an infinite absmax (and an infinite value then maps, as 0 * inf, to index 0)
    absmax = padded.masked_fill(padded.isnan(), 0.0).abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    # a subnormal absmax has an infinite reciprocal: 0 * inf is NaN, which bitsandbytes maps to
    # grid index 0, as -1
    scaled = (padded * inverse.unsqueeze(1)).nan_to_num_(nan=-1.0).clamp_(-1.0, 1.0)
    grid_index = ((scaled + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int64)
    indices = _lookup_table(code)[grid_index]
    indices[absmax == 0] = 0
    return indices.reshape(-1)[:numel].reshape(values.shape), absmax


def dequantize_blockwise(
    indices: Tensor, absmax: Tensor, code: Tensor | None = None, blocksize: int = DOUBLE_QUANT_BLOCKSIZE
) -> Tensor:
    """``v_i = code[q_i] * absmax[i // blocksize]`` in float32, shaped like ``indices``.

    ``indices`` are uint8 (as :func:`quantize_blockwise` gives them), ``code`` holds 256 values and
    ``absmax`` one floating-point value per block (``TypeError``/``ValueError`` otherwise).
    """
    _check_blocksize(blocksize)
    _check_tensor(indices, "indices", "a uint8 tensor")
    if indices.dtype != torch.uint8:
        raise TypeError(f"indices: expected a uint8 tensor (as quantize_blockwise gives), got dtype {indices.dtype}")
    if code is None:
        code = dynamic_map()
    _check_code(code)
    numel = indices.numel()
    n_blocks, _ = _blocks(numel, blocksize)
    _check_float_statistics(absmax, n_blocks, "absmax", lambda: f"one per block of {blocksize} for {numel} indices")
    flat = code.to(indices.device, torch.float32)[indices.reshape(-1).long()]
    padded = torch.zeros(n_blocks * blocksize, dtype=torch.float32, device=indices.device)
    padded[:numel] = flat
    out = (padded.view(n_blocks, blocksize) * absmax.float().view(-1, 1)).reshape(-1)[:numel]
    return out.reshape(indices.shape)


# ---- the whole codec --------------------------------------------------------------------------
@dataclass
class Quantized4bit:
    """Everything a 4-bit quantized tensor holds, named as in bitsandbytes' ``QuantState``.

    ``absmax`` is float32 per block, or uint8 when ``nested_absmax`` is set (double quantization:
    ``absmax_k = nested_code[absmax_k] * nested_absmax[k // 256] + offset``).
    """

    packed: Tensor
    absmax: Tensor
    shape: torch.Size
    quant_type: str
    blocksize: int
    code: Tensor
    nested_absmax: Tensor | None = None
    nested_code: Tensor | None = None
    offset: Tensor | None = None

    @property
    def double_quant(self) -> bool:
        """Whether the absmax values are themselves quantized (double quantization)."""
        return self.nested_absmax is not None


def quantize(
    weight: Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> Quantized4bit:
    """Quantize ``weight`` as bitsandbytes' ``quantize_4bit(..., compress_statistics=double_quant)``.

    With ``double_quant`` the float32 absmax is replaced by ``quantize_blockwise(absmax - offset)``
    in blocks of 256, ``offset = mean(absmax)`` (float32 ``torch.mean``).
    """
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant: expected a bool, got {double_quant!r}")
    packed, absmax = quantize_4bit(weight, quant_type, blocksize)
    code = four_bit_code(quant_type).to(packed.device)
    state = Quantized4bit(packed, absmax, torch.Size(weight.shape), quant_type, blocksize, code)
    if double_quant:
        offset = absmax.mean()
        nested_code = dynamic_map().to(packed.device)
        state.absmax, state.nested_absmax = quantize_blockwise(
            absmax - offset, nested_code, DOUBLE_QUANT_BLOCKSIZE
        )
        state.nested_code = nested_code
        state.offset = offset
    return state


def dequantize(state: Quantized4bit, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense tensor of ``state``, as bitsandbytes' ``dequantize_4bit`` computes it on the CPU."""
    absmax = state.absmax
    if state.double_quant:
        absmax = dequantize_blockwise(
            state.absmax, cast(Tensor, state.nested_absmax), state.nested_code, DOUBLE_QUANT_BLOCKSIZE
        )
        absmax = absmax + cast(Tensor, state.offset)
    return dequantize_4bit(
        state.packed, absmax, state.shape, state.quant_type, state.blocksize, dtype
    )


# ---- row-wise int8 (LLM.int8() weight format) -------------------------------------------------
# bitsandbytes dequantizes with the float32 reciprocal of 127 written as this literal
_INV_127 = 7.874015718698502e-3


def quantize_int8_rowwise(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise absmax int8: ``(codes int8 (out, in), absmax float32 (out,))``.

    ``codes = round(w * (127 / absmax_row))`` (round half to even), as bitsandbytes'
    ``int8_vectorwise_quant``; a zero row gets zero codes instead of bitsandbytes' 0 * inf. A
    ``weight`` that is not a floating-point tensor, or holds NaN or inf, raises
    ``TypeError``/``ValueError``.
    """
    _check_float_input(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D (out, in) tensor, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    codes = torch.round(w * (127.0 / absmax).unsqueeze(1))
    codes[absmax == 0] = 0
    codes = codes.to(torch.int8)
    _encode_tiny_int8_rows_(codes, w, absmax)
    return codes, absmax


def _encode_tiny_int8_rows_(codes: Tensor, weight: Tensor, absmax: Tensor) -> None:
    """Re-encode in ``codes`` the rows whose absmax is nonzero but below ``127 / FLT_MAX``
    (about 3.7e-37), as ``round(w / absmax_row * 127)``: there ``127 / absmax`` overflows to
    inf, and ``w * inf`` cast to int8 is undefined (zero on x86), so such a row would decode
    to zeros. Other rows keep bitsandbytes' codes bit for bit."""
    tiny = (absmax > 0) & torch.isinf(127.0 / absmax)
    if bool(tiny.any()):  # quantizing runs once per weight: the check's sync costs nothing
        rows = weight[tiny].float()
        codes[tiny] = torch.round(rows / absmax[tiny].unsqueeze(1) * 127.0).to(torch.int8)


def dequantize_int8_rowwise(codes: Tensor, absmax: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``w = codes * absmax_row / 127``, computed as bitsandbytes does (float32, times ``1/127``).

    The second product is taken in place: the same bits as bitsandbytes' two out-of-place
    products, with one (out, in) float32 allocation instead of two (on the CPU each large
    allocation is fresh memory whose page faults cost more than the arithmetic).

    ``codes`` is an int8 ``(out, in)`` tensor and ``absmax`` holds ``out`` floating-point values
    (``TypeError``/``ValueError`` otherwise; only sizes are checked, not the values).
    """
    _check_tensor(codes, "codes", "an int8 (out, in) tensor")
    if codes.dtype != torch.int8:
        raise TypeError(f"codes: expected an int8 (out, in) tensor, got dtype {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes: expected an int8 (out, in) tensor, got shape {tuple(codes.shape)}")
    _check_float_statistics(absmax, codes.shape[0], "absmax", lambda: f"one per row of codes {tuple(codes.shape)}")
    _check_float_dtype(dtype)
    return torch.mul(codes, absmax.float().view(-1, 1)).mul_(_INV_127).to(dtype)
