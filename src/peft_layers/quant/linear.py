"""QuantizedLinear: a frozen linear layer whose weight is stored in 4 or 8 bits.

Schemes (``scheme=``):

- ``"nf4"`` / ``"fp4"``: blockwise absmax 4-bit (QLoRA). The flattened weight is cut into blocks of
  ``blocksize`` values; value ``i`` of block ``k`` is stored as the 4-bit index ``q_i`` of one of 16
  levels ``c`` and read back as ``w_i = c[q_i] * absmax_k``. With ``double_quant`` the float32
  ``absmax`` is itself stored in 8 bits (blocks of 256, mean offset subtracted, dynamic map).
- ``"int8"``: row-wise absmax int8 (LLM.int8() weight format): ``w_ij = q_ij * absmax_i / 127``.
  ``blocksize`` and ``double_quant`` do not apply; they are recorded as None and False.

Storage is bitsandbytes' own layout, held as the module's parameter and buffers so that
``state_dict``, ``.to(device)`` and ``copy.deepcopy`` cover all of it:

=================  =====================================  ====================================
name               4-bit                                  int8
=================  =====================================  ====================================
``weight``         uint8 ``(ceil(out*in/2), 1)``, two     int8 ``(out, in)`` (bnb's ``CB``)
                   codes per byte (``Params4bit.data``)
``absmax``         float32 ``(blocks,)``, or uint8 with   float32 ``(out,)`` (bnb's ``SCB``)
                   double quantization
``code``           float32 ``(16,)``, the levels          --
``nested_absmax``  float32 ``(ceil(blocks/256),)``        --
``nested_code``    float32 ``(256,)``, the dynamic map    --
``offset``         float32 scalar, mean of absmax         --
``bias``           frozen Parameter or None               frozen Parameter or None
=================  =====================================  ====================================

bitsandbytes does the arithmetic when it can be imported; otherwise the pure-PyTorch codec in
:mod:`peft_layers.quant.reference` (bit-identical on the CPU) takes over.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from .._warnings import warn as _warn
from .. import _row_blocks
from .._devices import LAYER_DTYPES, is_layer_dtype
from ..adapter import autocast_dtype, autocast_off, check_linear_input, functorch_active, has_hooks, tracing
from ..lora import _check_features
from . import _bnb
from . import reference as ref

# the public names (the rest is internal, underscore or not); docs/api.md lists them all
__all__ = [
    "BLOCKSIZES",
    "COMPUTE_DTYPES",
    "QUANT_SCHEMES",
    "QuantizedLinear",
]

QUANT_SCHEMES = ("nf4", "fp4", "int8")
#: block sizes bitsandbytes' quantize_4bit accepts
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES = LAYER_DTYPES  # the dtypes any layer of the library computes in

# How the matmul runs. Measured on this project's 2-core AVX512 (VNNI, BF16) CPU, bitsandbytes
# 0.50.2, torch 2.13: x (512, in) float32, 2 threads, each path timed in 15 interleaved rounds and
# the minimum kept (the machine was shared), relative to a dense float32 F.linear of that shape:
#
#                                             1024 x 1024        4096 x 4096
#   dense float32 F.linear                    31.6 ms  1.00x     207 ms  1.00x
#   nf4 dequantize + F.linear                 30.5 ms  0.96x     285 ms  1.37x
#   nf4 bnb.matmul_4bit (standard layout)     44.0 ms  1.39x     274 ms  1.32x
#   nf4 bnb Linear4bit eval (repacked, bf16)  26.2 ms  0.83x     125 ms  0.60x
#   fp4: the same within noise (1.70x / 1.76x / 0.89x; 1.41x / 1.26x / 0.61x)
#   int8 dequantize + F.linear                28.1 ms  0.89x     349 ms  1.68x
#   int8 bnb.matmul (int8 activations)        14.6 ms  0.46x      70 ms  0.34x
#
# 4-bit on the CPU: dequantize + F.linear (a large weight in row blocks, DECODE_BLOCK_BYTES
# below). bnb.matmul_4bit on the standard layout does the same work (dequantize, then F.linear).
# The one faster bitsandbytes path, Linear4bit's eval kernel (2.3x faster at 4096 here; issue 3
# measured it 2.4x slower on its machine), needs the weight
# repacked into its AVX512-BF16 layout, which we must never trigger: that layout drops double
# quantization (0.531 bytes/weight, over our 0.53 budget), rounds absmax to bfloat16 and multiplies
# in bfloat16 (3.2e-3 relative error against x @ dequantize()^T, against 2.6e-7 for ours).
#
# int8: bitsandbytes' int8 path (LLM.int8(), threshold 0) is 2x to 5x faster, but it quantizes the
# activations to int8 as well: 8.7e-3 relative error against x @ dequantize()^T. Then forward()
# no longer equals the dequantized weight's product, which QLoRA's merge (to_linear() == unmerged
# output) and the float64 references rely on. So the exact path is the default on every device,
# and ``int8_activations = True`` opts into bitsandbytes' int8 kernel (CPU and CUDA).
#
# CUDA, 4-bit: bnb.matmul_4bit (in 0.50 its gemm_4bit op: fused kernels up to 1536 rows, else
# dequantize + matmul, also when in_features is not a multiple of the block size).

#: On the CPU, the decode + GEMM paths decode the weight in blocks of rows of at most this many
#: bytes (see peft_layers._row_blocks). Measured on a 2-core AMD EPYC (AVX2), x (512, 4096)
#: float32, NF4 4096 x 4096: a forward took 212 ms decoded whole, 151 / 145 / 149 / 189 ms in
#: blocks of 4 / 8 / 16 / 32 MiB. At 32 MiB glibc maps each block afresh (its mmap threshold
#: tops out there); below, a freed block is reused. A weight within one block (1024 x 1024 in
#: float32 is 4 MiB) decodes whole.
DECODE_BLOCK_BYTES = 8 << 20


def _check_scheme(scheme: Any) -> None:
    if scheme not in QUANT_SCHEMES:
        raise ValueError(f"scheme: expected one of {QUANT_SCHEMES}, got {scheme!r}")


def _check_blocksize(blocksize: Any) -> None:
    # any integer type (numpy's too, as rank takes), but not bool
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral) or blocksize not in BLOCKSIZES:
        raise ValueError(
            f"blocksize: expected a power of two bitsandbytes supports, one of {BLOCKSIZES}, "
            f"got {blocksize!r}"
        )


def _bias_compute_dtype(module: nn.Module) -> torch.dtype:
    """The compute dtype a wrapped bitsandbytes module implies when it names none: its bias's
    (transformers loads the bias in the model's dtype, and bitsandbytes computes in the input's,
    which is that dtype), else float32."""
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor) and bias.dtype in COMPUTE_DTYPES:
        return bias.dtype
    return torch.float32


def _decodes_with_reference(device_type: str, in_features: int, blocksize: int) -> bool:
    """Whether a 4-bit weight on ``device_type`` decodes through the reference codec rather than
    bitsandbytes' ``dequantize_4bit`` (the same bits either way). On the CPU, bitsandbytes 0.50's
    kernel reads the absmax of a block that spans two rows from the wrong place (``in_features``
    not a multiple of ``blocksize``), and for ``blocksize >= 2048`` it falls back to a
    ``torch.compile``'d function (seconds to compile per shape). On MPS its op is either a kernel
    fetched from the Hugging Face Hub on first use (macOS 26 with the ``kernels`` package) or that
    same compiled function, compiled again for every layer shape; the reference is plain tensor
    ops. CUDA (and any other device bitsandbytes serves) keeps bitsandbytes' kernel."""
    if device_type == "mps":
        return True
    return device_type == "cpu" and bool(in_features % blocksize or blocksize >= 2048)


def _check_compute_dtype(compute_dtype: Any) -> None:
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype: expected one of {COMPUTE_DTYPES}, got {compute_dtype!r}")


class _QuantizedMatmul(torch.autograd.Function):
    """``x W^T + b`` for 2-D ``x`` with ``W`` quantized.

    Backward gives ``x`` (and ``b``, if it requires grad) a gradient: ``grad_x = grad W``. ``W`` is
    dequantized again in backward instead of being saved (a large one on the CPU a block of rows
    at a time, :data:`DECODE_BLOCK_BYTES`), so no dense copy of the weight stays alive between
    forward and backward.
    """

    @staticmethod
    def forward(x: Tensor, bias: Tensor | None, layer: QuantizedLinear) -> Tensor:
        return layer._matmul_2d(x, bias)

    # forward and setup_context apart (not forward(ctx, ...)): torch.func's transforms (grad,
    # jacrev, ...) require it, and vmap runs forward's own ops over the batch
    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        layer = inputs[2]
        ctx.layer = layer
        ctx.version = layer.version
        ctx.rows = inputs[0].shape[0]

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        layer: QuantizedLinear = ctx.layer
        if layer.version != ctx.version:
            raise RuntimeError(
                "QuantizedLinear: the quantized weight changed (requantize_, load_state_dict or "
                ".to) between forward and backward; the gradient would use the wrong weight"
            )
        need_x, need_bias = ctx.needs_input_grad[:2]
        grad_x = _row_blocks.grad_times_weight(grad_out, layer._decode_blocks(grad_out.dtype)) if need_x else None
        grad_bias = grad_out.sum(0) if need_bias else None
        return grad_x, grad_bias, None

    @staticmethod
    def jvp(ctx: Any, tangent_x: Tensor | None, tangent_bias: Tensor | None, _: None) -> Tensor | None:
        """Forward mode (``torch.func.jvp``, ``jacfwd``, ``hessian``): the product is linear, so
        its tangent is ``dx W^T + db``, with the ``W`` backward uses."""
        if tangent_x is None:
            return None if tangent_bias is None else tangent_bias.expand(ctx.rows, -1)
        tangent = tangent_x @ ctx.layer.dequantize(tangent_x.dtype).t()
        return tangent if tangent_bias is None else tangent + tangent_bias


class QuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` replacement with a 4-bit (NF4/FP4) or int8 weight.

    ``y = x W^T + b`` with ``W = dequantize()``; computed in ``compute_dtype`` and returned in the
    input's dtype. Nothing requires grad; gradients flow to the input only.

    Args:
        in_features, out_features: as ``nn.Linear``.
        bias: whether the layer holds a bias (zeros until loaded or quantized from a Linear).
        scheme: "nf4", "fp4" or "int8".
        blocksize: values per absmax block for 4-bit, one of :data:`BLOCKSIZES` (ignored by int8).
        double_quant: quantize the 4-bit absmax values to 8 bits as well (ignored by int8).
        compute_dtype: dtype of dequantized weights and of the matmul.
        device: where the storage lives.

    The constructor builds a layer whose weight is all zeros; :meth:`from_linear` quantizes an
    ``nn.Linear`` and :meth:`from_bnb` wraps a bitsandbytes layer. A constructed layer of the same
    configuration loads any such layer's ``state_dict``.

    Attributes:
        source_cls: the class transformers replaced with the wrapped bitsandbytes module (its
            ``source_cls``, e.g. GPT-2's ``Conv1D``), or None: ``merge_and_unload`` gives a layer
            of that layout back.
        from_bitsandbytes: True for a layer built by :meth:`from_bnb`, as transformers' 4/8-bit
            loading makes them (kept through requantizing, copies, pickling and ``.to``; not in
            the state dict, so a layer built fresh and loaded from one says False): its model was
            loaded quantized (``peft_layers.model.loaded_quantized``).
    """

    source_cls: type | None = None
    from_bitsandbytes: bool = False
    weight: nn.Parameter
    bias: nn.Parameter | None
    absmax: Tensor
    code: Tensor
    nested_absmax: Tensor
    nested_code: Tensor
    offset: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        scheme: str = "nf4",
        blocksize: int | None = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_features(in_features, out_features)
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {bias!r}")
        _check_scheme(scheme)
        _check_compute_dtype(compute_dtype)
        if scheme == "int8":
            blocksize, double_quant = None, False
        else:
            _check_blocksize(blocksize)
            if not isinstance(double_quant, bool):
                raise TypeError(f"double_quant: expected a bool, got {double_quant!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.blocksize: int | None = None if blocksize is None else int(blocksize)
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        #: changes whenever the stored weight may have changed (requantize_, load_state_dict, .to)
        self.version = 0
        self._int8_activations = False
        # (bitsandbytes module, its weight tensor) when built by from_bnb over shared storage;
        # a tuple, so that nn.Module does not register the module as a child
        self._bnb_source: tuple[nn.Module, Tensor] | None = None
        self._allocate(device)
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    def _allocate(self, device: torch.device | str | None) -> None:
        """Storage for an all-zero weight, shaped as quantization will fill it."""
        out_f, in_f = self.out_features, self.in_features
        if self.scheme == "int8":
            self.weight = nn.Parameter(
                torch.zeros(out_f, in_f, dtype=torch.int8, device=device), requires_grad=False
            )
            self.register_buffer("absmax", torch.zeros(out_f, dtype=torch.float32, device=device))
            return
        numel = out_f * in_f
        n_blocks = -(-numel // cast(int, self.blocksize))
        zero_code = 0x77 if self.scheme == "nf4" else 0x00  # the code of 0.0, twice
        self.weight = nn.Parameter(
            torch.full(((numel + 1) // 2, 1), zero_code, dtype=torch.uint8, device=device),
            requires_grad=False,
        )
        # the table is copied from a CPU constant, so it goes where the factories above put the
        # weight: `device`, or else the default device (a `with torch.device(...)` block included)
        self.register_buffer("code", ref.four_bit_code(self.scheme).to(self.weight.device))
        if self.double_quant:
            n_nested = -(-n_blocks // ref.DOUBLE_QUANT_BLOCKSIZE)
            self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("nested_absmax", torch.zeros(n_nested, dtype=torch.float32, device=device))
            self.register_buffer("nested_code", ref.dynamic_map().to(self.weight.device))
            self.register_buffer("offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.float32, device=device))

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        scheme: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
    ) -> QuantizedLinear:
        """Quantize ``linear.weight`` (the bias is copied as is, frozen).

        4-bit goes through ``bitsandbytes.functional.quantize_4bit`` (float32 input), int8 through
        ``int8_vectorwise_quant``; without bitsandbytes, through the reference codec (same bits).
        ``linear`` itself is not modified.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            scheme=scheme,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            device=linear.weight.device,
        )
        layer.requantize_(linear.weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    @classmethod
    def from_bnb(cls, module: nn.Module, compute_dtype: torch.dtype | None = None) -> QuantizedLinear:
        """Wrap a quantized ``bitsandbytes.nn.Linear4bit`` or ``Linear8bitLt`` without requantizing.

        The packed codes and quantization statistics are taken over as they are (the tensors are
        shared, not copied). ``compute_dtype`` defaults to the module's ``compute_dtype`` (4-bit)
        if set, else the dtype of its bias (what transformers loaded the model in: bitsandbytes
        computes in the input's dtype), else float32 (``inject_adapters`` gives such a module the
        model's dtype instead).

        bitsandbytes >= 0.48 repacks a 4-bit weight in place into a CPU-only layout on the first
        eval-mode forward on an AVX512-BF16 CPU (``quant_state.packing_format_for_cpu``), with
        the absmax rounded to bfloat16 and double quantization dropped. Such a weight is unpacked
        here into the standard layout; with double quantization the bfloat16 absmax values are
        quantized again (blocks of 256), so the result differs from the original by the bfloat16
        rounding of absmax (relative 2^-9) plus the 8-bit quantization of absmax.

        ``Linear8bitLt``'s outlier threshold is not carried over: this layer multiplies by the
        dequantized weight, which keeps full-precision inputs anyway.
        """
        modules = _bnb.load()
        bnb = modules[0] if modules is not None else None
        if bnb is not None and isinstance(module, bnb.nn.Linear4bit):
            layer = cls._from_linear4bit(module, compute_dtype)
        elif bnb is not None and isinstance(module, bnb.nn.Linear8bitLt):
            layer = cls._from_linear8bit(module, compute_dtype)
        else:
            raise TypeError(
                "module: expected a quantized bitsandbytes.nn.Linear4bit or bitsandbytes.nn.Linear8bitLt, "
                f"got {type(module).__name__}"
                + ("" if bnb is not None else " (bitsandbytes cannot be imported here)")
            )
        layer.source_cls = getattr(module, "source_cls", None)
        layer.from_bitsandbytes = True
        if has_hooks(module):
            _warn(
                f"QuantizedLinear.from_bnb(): the {type(module).__name__} has hooks of its own, which "
                "will not run: this layer decodes the module's weight and computes without calling it. "
                "Register them on the QuantizedLinear (a QLoRA layer's base_layer) instead",
            )
        return layer

    @classmethod
    def _from_linear4bit(cls, module: nn.Linear, compute_dtype: torch.dtype | None) -> QuantizedLinear:
        weight = module.weight
        state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
        if state is None:
            raise ValueError(
                "module: this Linear4bit is not quantized yet (its weight has no quant_state); "
                "move it to a device first, e.g. module.to('cpu')"
            )
        if compute_dtype is None:
            compute_dtype = getattr(module, "compute_dtype", None) or _bias_compute_dtype(module)
        nested = getattr(state, "nested", False)
        data = weight.data
        converted = bool(getattr(state, "packing_format_for_cpu", False))
        if converted:
            nested = getattr(state, "original_nested", False)
            data, absmax = _undo_cpu_repack(data, state)
        else:
            absmax = state.absmax
            if data.dtype != torch.uint8:  # quant_storage other than uint8 (e.g. for FSDP)
                data = data.view(torch.uint8).reshape(-1, 1)
            blocks = -(-module.out_features * module.in_features // state.blocksize)
            if not nested and absmax.dim() == 2 and absmax.dtype == torch.bfloat16:
                # Params4bit.cuda() of a CPU-repacked weight restores the codes and clears the
                # flag, but leaves a plain absmax in the CPU layout: bf16, (in / blocksize, out)
                absmax, converted = absmax.t().reshape(-1).float(), True
            expected_dtype = torch.uint8 if nested else torch.float32
            if absmax.dtype != expected_dtype or absmax.numel() != blocks:
                raise ValueError(
                    f"module: quant_state.absmax is {absmax.dtype} with {absmax.numel()} values; a "
                    f"{'nested' if nested else 'plain'} {state.quant_type} weight of "
                    f"{module.out_features}x{module.in_features} in blocks of {state.blocksize} needs "
                    f"{blocks} {expected_dtype} values"
                )
        layer = cls(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            scheme=state.quant_type,
            blocksize=state.blocksize,
            double_quant=bool(nested),
            compute_dtype=compute_dtype,
            device=data.device,
        )
        if tuple(state.shape) != (module.out_features, module.in_features):
            raise ValueError(
                f"module: quant_state.shape {tuple(state.shape)} does not match "
                f"(out_features, in_features) = {(module.out_features, module.in_features)}"
            )
        if converted:
            layer._store(layer._encode_4bit(data, absmax.float()))  # re-applies double quantization if nested
        else:
            layer._bnb_source = (module, data)
            layer.weight = nn.Parameter(data, requires_grad=False)
            layer.absmax = absmax
            layer.code = state.code
            if nested:
                if state.state2.blocksize != ref.DOUBLE_QUANT_BLOCKSIZE:
                    raise ValueError(
                        f"module: nested blocksize {state.state2.blocksize} is not supported; "
                        f"expected {ref.DOUBLE_QUANT_BLOCKSIZE}"
                    )
                layer.nested_absmax = state.state2.absmax
                layer.nested_code = state.state2.code
                layer.offset = torch.as_tensor(state.offset, dtype=torch.float32, device=data.device)
        layer._take_bias(module)
        return layer

    @classmethod
    def _from_linear8bit(cls, module: nn.Linear, compute_dtype: torch.dtype | None) -> QuantizedLinear:
        lt_state: Any = module.state
        # the codes are the weight itself: state.CB of a has_fp16_weights=True module (set by its
        # forward) is a snapshot of a float weight that keeps training, and CB/SCB attributes can
        # be left on another device by a parent's .to() (Module._apply swaps the parameter's data)
        codes = module.weight.data
        row_absmax = lt_state.SCB if lt_state.SCB is not None else getattr(module.weight, "SCB", None)
        if getattr(lt_state, "has_fp16_weights", False) or codes.dtype != torch.int8 or row_absmax is None:
            raise ValueError(
                "module: this Linear8bitLt holds no int8 weight (has_fp16_weights=True, or not "
                "moved to a device yet); only quantized Linear8bitLt layers can be wrapped"
            )
        if row_absmax.device != codes.device or row_absmax.shape != (module.out_features,):
            raise ValueError(
                f"module: its row statistics (SCB) are {tuple(row_absmax.shape)} on {row_absmax.device}, "
                f"its int8 weight is on {codes.device}: expected ({module.out_features},) beside the "
                "weight (move the Linear8bitLt itself with .to(device))"
            )
        layer = cls(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            scheme="int8",
            compute_dtype=compute_dtype or _bias_compute_dtype(module),
            device=codes.device,
        )
        layer._bnb_source = (module, codes)
        layer.weight = nn.Parameter(codes, requires_grad=False)
        layer.absmax = row_absmax
        layer._take_bias(module)
        return layer

    @property
    def bnb_module(self) -> nn.Module | None:
        """The bitsandbytes ``Linear4bit``/``Linear8bitLt`` this layer wraps (built by
        :meth:`from_bnb`), while both still hold the same quantized weight; else None.

        None when the layer was not built from a bitsandbytes module, when ``from_bnb`` had to
        convert the weight (a CPU-repacked 4-bit weight), or once the weight was requantized,
        loaded from a state dict or moved to other storage. ``peft_layers.unload`` gives this
        module back in place of the layer, so a model loaded by transformers in 4 or 8 bits gets
        its own layers back.
        """
        source = self.__dict__.get("_bnb_source")  # absent in layers pickled by older versions
        if source is None:
            return None
        module, weight = source
        if not (_same_storage(weight, self.weight) and _same_storage(module.weight, self.weight)):
            return None  # e.g. moved, or the module repacked its weight (its CPU eval forward)
        if not _same_storage(module.bias, self.bias):
            return None  # model.half() cast this layer's bias but not the module's
        return module

    def __getstate__(self) -> dict[str, Any]:
        # a copy or a pickle holds storage of its own: the wrapped bitsandbytes module stays behind
        parent = getattr(super(), "__getstate__", None)  # nn.Module's, or object's (Python >= 3.11)
        state = dict(parent()) if parent is not None else self.__dict__.copy()
        state.pop("_bnb_source", None)
        return state

    def _take_bias(self, module: nn.Linear) -> None:
        if module.bias is not None:
            self.bias = nn.Parameter(module.bias.data, requires_grad=False)

    # ---- the weight ---------------------------------------------------------------------
    def requantize_(self, weight: Tensor) -> None:
        """Re-encode a dense ``(out, in)`` weight into this layer (same scheme and settings).

        New storage tensors replace the old ones (nothing is written in place, so a bitsandbytes
        module this layer wraps is left alone; ``self.weight`` stays the same Parameter object);
        ``version`` increments.
        """
        expected = (self.out_features, self.in_features)
        if not isinstance(weight, Tensor) or tuple(weight.shape) != expected:
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(f"weight: expected a tensor of shape {expected}, got {shape}")
        if not weight.is_floating_point():
            raise TypeError(f"weight: expected a floating-point tensor, got dtype {weight.dtype}")
        if weight.is_meta or self.weight.is_meta:
            raise ValueError(
                "weight: a tensor on the meta device holds no values to quantize; materialise the "
                "model first (load its weights, or build it on a real device)"
            )
        with torch.no_grad():
            weight = weight.detach()
            per_block = self._decode_rows_per_block(torch.float32)
            if per_block is None:
                encoded = self._encode_rows(weight)
            else:  # a large weight on the CPU, in the row blocks the decode uses (see there)
                blocks = [self._encode_rows(weight[rows]) for rows in self._row_slices(per_block)]
                encoded = {name: torch.cat([block[name] for block in blocks]) for name in blocks[0]}
            tensors = encoded if self.scheme == "int8" else self._encode_4bit(**encoded)
            self._check_decodable(tensors, weight)
            self._store(tensors)
        self.version += 1
        self._bnb_source = None

    def _encode_rows(self, weight: Tensor) -> dict[str, Tensor]:
        """The codes and float32 absmax of some whole rows of a weight (4-bit: ``packed`` and
        ``absmax``, one per block; int8: ``weight`` and ``absmax``, one per row), from a float32
        copy of just those rows. A row ends a 4-bit block wherever :meth:`requantize_` cuts the
        weight into rows, so the rows' codes are those of the whole weight."""
        dense = weight.to(device=self.weight.device, dtype=torch.float32).contiguous()
        if not bool(torch.isfinite(dense).all()):
            raise ValueError("weight: expected finite values, got NaN or inf")
        if self.scheme == "int8":
            return self._encode_int8(dense)
        packed, absmax = self._quantize_4bit(dense)
        return {"packed": packed, "absmax": absmax}

    def _quantize_4bit(self, dense: Tensor) -> tuple[Tensor, Tensor]:
        """(packed codes, float32 absmax) of a float32 weight."""
        modules = _bnb.load(cuda=dense.is_cuda)
        if modules is None:
            return ref.quantize_4bit(dense, self.scheme, cast(int, self.blocksize))
        packed, state = modules[1].quantize_4bit(
            dense, blocksize=self.blocksize, compress_statistics=False, quant_type=self.scheme
        )
        return packed, state.absmax

    def _store(self, tensors: dict[str, Tensor]) -> None:
        """Replace the quantized tensors by ``tensors`` (by name; nothing is written in place)."""
        for name, tensor in tensors.items():
            if name == "weight":
                self.weight.data = tensor  # same Parameter object, new storage
            else:
                setattr(self, name, tensor)

    def _check_decodable(self, tensors: dict[str, Tensor], dense: Tensor) -> None:
        """Refuse (``ValueError``) finite weights so large that their codes decode to inf or NaN:
        int8 decodes ``code * absmax_row`` with codes up to 127; double quantization decodes the
        absmax as ``nested * code + mean(absmax)``, whose float32 mean overflows first."""
        if self.scheme == "int8":
            decodable = torch.isfinite(tensors["absmax"].amax() * 127)
            why = "int8 decodes codes up to 127 times the row's absmax"
        elif self.double_quant:
            decodable = torch.isfinite(tensors["nested_absmax"].abs().amax() + tensors["offset"].abs())
            why = "double quantization decodes the absmax around their float32 mean"
        else:
            return  # levels within [-1, 1] times a finite absmax
        if not bool(decodable):
            raise ValueError(
                f"weight: values up to {dense.abs().amax().item():.3g} would decode to inf in float32 "
                f"({why}); scale the weight down"
                + (", or build the layer with double_quant=False" if self.double_quant else "")
            )

    def _encode_4bit(self, packed: Tensor, absmax: Tensor) -> dict[str, Tensor]:
        """The tensors that store packed codes and a float32 absmax, the absmax double-quantized
        if configured."""
        code = ref.four_bit_code(self.scheme).to(packed.device)
        if not self.double_quant:
            return {"weight": packed, "code": code, "absmax": absmax}
        offset = absmax.mean()
        modules = _bnb.load(cuda=absmax.is_cuda)
        if modules is None:
            nested_code = ref.dynamic_map().to(absmax.device)
            qabsmax, nested_absmax = ref.quantize_blockwise(
                absmax - offset, nested_code, ref.DOUBLE_QUANT_BLOCKSIZE
            )
        else:
            qabsmax, nested = modules[1].quantize_blockwise(
                absmax - offset, blocksize=ref.DOUBLE_QUANT_BLOCKSIZE
            )
            nested_absmax, nested_code = nested.absmax, nested.code
        return {
            "weight": packed, "code": code, "absmax": qabsmax, "nested_absmax": nested_absmax,
            "nested_code": nested_code, "offset": offset,
        }

    def _encode_int8(self, dense: Tensor) -> dict[str, Tensor]:
        modules = _bnb.load()
        if modules is None or dense.device.type != "cpu":
            # bitsandbytes' CUDA kernel takes float16 only: rows beyond 65504 would turn inf (and
            # decode to NaN) and tiny rows lose digits; the float32 reference runs on any device
            codes, absmax = ref.quantize_int8_rowwise(dense)
        else:
            codes, absmax, _ = modules[1].int8_vectorwise_quant(dense)
            codes[absmax == 0] = 0  # a zero row: bitsandbytes computes 0 * (127 / 0)
            ref._encode_tiny_int8_rows_(codes, dense, absmax)  # and w * inf below 3.7e-37
        return {"weight": codes, "absmax": absmax.float()}

    def _bnb_quant_state(self, functional: Any, dtype: torch.dtype) -> Any:
        """A bitsandbytes QuantState over this layer's tensors (no copies)."""
        nested = None
        if self.double_quant:
            nested = functional.QuantState(
                absmax=self.nested_absmax,
                code=self.nested_code,
                blocksize=ref.DOUBLE_QUANT_BLOCKSIZE,
                dtype=torch.float32,
            )
        return functional.QuantState(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            code=self.code,
            blocksize=self.blocksize,
            quant_type=self.scheme,
            dtype=dtype,
            offset=self.offset if self.double_quant else None,
            state2=nested,
        )

    def _reference_state(self) -> ref.Quantized4bit:
        return ref.Quantized4bit(
            packed=self.weight,
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            quant_type=self.scheme,
            blocksize=cast(int, self.blocksize),
            code=self.code,
            nested_absmax=self.nested_absmax if self.double_quant else None,
            nested_code=self.nested_code if self.double_quant else None,
            offset=self.offset if self.double_quant else None,
        )

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """A fresh dense ``(out, in)`` weight in ``dtype`` (default ``compute_dtype``); the caller
        may modify it.

        4-bit: ``W_i = code[q_i] * a[i // blocksize]`` with ``a`` the stored ``absmax``, or with
        double quantization ``a_k = nested_code[absmax_k] * nested_absmax[k // 256] + offset``;
        int8: ``W_ij = q_ij * absmax_i / 127``.
        A 4-bit weight decodes straight into a 16-bit ``dtype``, with the same bits as decoding to
        float32 and casting.
        """
        dtype = dtype or self.compute_dtype
        if not is_layer_dtype(dtype):
            raise TypeError(f"dtype: expected one of {LAYER_DTYPES}, got {dtype!r}")
        # bitsandbytes' kernels produce 16/32-bit floats; float64 is the exact float32 result cast
        kernel_dtype = torch.float32 if dtype == torch.float64 else dtype
        if self.scheme == "int8":
            # bitsandbytes' int8_vectorwise_dequant is this formula in plain torch ops on every
            # device; the reference gives the same bits with one allocation instead of two
            return ref.dequantize_int8_rowwise(self.weight, self.absmax, dtype)
        weight = self.weight
        modules = _bnb.load(cuda=weight.is_cuda)
        # the flags first: building a torch.device costs more than the checks (see adapter._device_type)
        device_type = "cpu" if weight.is_cpu else "cuda" if weight.is_cuda else weight.device.type
        blocksize = cast(int, self.blocksize)  # None only for int8, handled above
        if modules is None or _decodes_with_reference(device_type, self.in_features, blocksize):
            return ref.dequantize(self._reference_state(), kernel_dtype).to(dtype)
        functional = modules[1]
        state = self._bnb_quant_state(functional, kernel_dtype)
        # reshape: for out * in <= 2 the packed weight is (1, 1), and bitsandbytes then transposes
        # its result (a shim for an old layout)
        decoded = functional.dequantize_4bit(weight, state)
        return decoded.reshape(self.out_features, self.in_features).to(dtype)

    def _decode_rows_per_block(self, dtype: torch.dtype) -> int | None:
        """How many rows :meth:`_decode_blocks` decodes at a time, or None to decode whole: on
        CUDA (bitsandbytes' decode is fast there and the caching allocator reuses memory), while
        tracing (out= products into views), with the reference codec, and where a row does not
        end a quantization block (``in_features`` not a multiple of ``blocksize``)."""
        if not self.weight.is_cpu or tracing():
            return None
        if self.scheme != "int8":
            blocksize = cast(int, self.blocksize)
            if _bnb.load() is None or self.in_features % blocksize or blocksize >= 2048:
                return None
        rows = DECODE_BLOCK_BYTES // max(1, self.in_features * dtype.itemsize)
        return max(1, rows) if rows < self.out_features else None

    def _decodes_in_blocks(self, dtype: torch.dtype) -> bool:
        """Whether :meth:`_decode_blocks` gives more than one block."""
        return self._decode_rows_per_block(dtype) is not None

    def _decode_blocks(self, dtype: torch.dtype) -> _row_blocks.RowBlocks:
        """``W`` in ``dtype`` as row blocks (:mod:`peft_layers._row_blocks`), decoded as they are
        consumed, each with the bits of the same rows of :meth:`dequantize`; one block where
        :meth:`_decode_rows_per_block` says so."""
        per_block = self._decode_rows_per_block(dtype)
        if per_block is None:
            return _row_blocks.whole(self.dequantize(dtype))
        decode_rows = self._row_decoder(dtype)
        return ((rows, decode_rows(rows)) for rows in self._row_slices(per_block))

    def _row_slices(self, per_block: int) -> list[slice]:
        """Slices of ``per_block`` rows (the last one shorter) covering the weight's rows in
        order: the blocks that :meth:`_decode_blocks` decodes and :meth:`requantize_` encodes."""
        return [slice(start, min(start + per_block, self.out_features))
                for start in range(0, self.out_features, per_block)]

    def _row_decoder(self, dtype: torch.dtype) -> Callable[[slice], Tensor]:
        """A function decoding ``W[rows]`` in ``dtype``; the nested absmax is decoded once, here,
        as bitsandbytes' ``dequantize_4bit`` decodes it (the same ops, the same bits)."""
        if self.scheme == "int8":
            return lambda rows: ref.dequantize_int8_rowwise(self.weight[rows], self.absmax[rows], dtype)
        functional = _bnb.loaded()[1]
        kernel_dtype = torch.float32 if dtype == torch.float64 else dtype
        absmax = self.absmax
        if self.double_quant:
            state = self._bnb_quant_state(functional, kernel_dtype)
            absmax = functional.dequantize_blockwise(self.absmax, state.state2)
            absmax += self.offset
        packed = self.weight.reshape(-1)
        blocks_per_row = self.in_features // cast(int, self.blocksize)
        half_row = self.in_features // 2  # in_features is a multiple of blocksize: even

        def decode_rows(rows: slice) -> Tensor:
            state = functional.QuantState(
                absmax=absmax[rows.start * blocks_per_row: rows.stop * blocks_per_row],
                shape=torch.Size((rows.stop - rows.start, self.in_features)),
                code=self.code, blocksize=self.blocksize, quant_type=self.scheme, dtype=kernel_dtype,
            )
            codes = packed[rows.start * half_row: rows.stop * half_row].reshape(-1, 1)
            return functional.dequantize_4bit(codes, state).to(dtype)

        return decode_rows

    # ---- the matmul ---------------------------------------------------------------------
    def _bnb_kernel_for(self, x: Tensor) -> str | None:
        """Which of bitsandbytes' matmul kernels :meth:`forward` runs on the 2-D ``x``: ``"int8"``
        (``int8_activations``), ``"4bit"`` (``matmul_4bit``, on CUDA), or None when it decodes the
        weight and calls ``F.linear``, computing exactly ``x @ dequantize(x.dtype)^T`` (on the CPU,
        a large weight a block of rows, hence of output columns, at a time: the same dot products,
        see :mod:`peft_layers._row_blocks`)."""
        # bitsandbytes' kernels take raw pointers and check no device: an input on another device
        # than the weight goes to F.linear, which raises PyTorch's own error (get_device() builds
        # no torch.device: -1 on the CPU)
        # under torch.func (vmap, grad) too: bitsandbytes' ops have no batching rules
        if (
            _bnb.load(cuda=x.is_cuda) is None or x.shape[0] == 0 or x.dtype == torch.float64
            or x.get_device() != self.weight.get_device() or functorch_active()
        ):
            return None
        if self.scheme == "int8":
            return "int8" if self.int8_activations else None
        # a row split across blocks (in_features not a multiple of blocksize) makes bitsandbytes
        # warn on every call and fall back to the same dequantize + F.linear
        return "4bit" if x.is_cuda and self.in_features % cast(int, self.blocksize) == 0 else None

    def _matmul_2d(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """``x W^T + b`` for 2-D ``x`` in ``x``'s dtype (the compute dtype, or autocast's),
        without autograd."""
        kernel = self._bnb_kernel_for(x)
        if kernel == "int8":
            # bitsandbytes' int8 GEMM runs torch.matmul inside on CPUs without AVX512 (its default
            # backend) and on CUDA for in_features % 4 != 0: autocast would run that in float16,
            # where int32 dot products past 65504 become inf. The input is in its dtype already.
            with autocast_off(x):
                return self._int8_matmul_2d(x, bias)
        if kernel is not None:
            bnb, functional = _bnb.loaded()
            state = self._bnb_quant_state(functional, x.dtype)
            return bnb.matmul_4bit(x, self.weight.t(), quant_state=state, bias=bias)
        return _row_blocks.linear(x, self._decode_blocks(x.dtype), bias, self.out_features)

    def _int8_matmul_2d(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """``x W^T + b`` through bitsandbytes' int8 GEMM (``int8_activations``): LLM.int8()
        without outliers, as ``bnb.matmul`` runs it in eval: ``x`` row-wise to int8 (through
        float16), an int32 GEMM, both row scales applied to the result."""
        functional = _bnb.loaded()[1]
        # contiguous: bitsandbytes' CUDA kernel reads rows at A + row * cols (.to with a
        # memory format returns a float16 view as it is, strides and all)
        x16 = x.to(torch.float16).contiguous()
        codes_x, absmax_x, _ = functional.int8_vectorwise_quant(x16)
        # an all-zero row gives 0 * (127 / 0) in bitsandbytes; masked_fill_ needs no
        # nonzero() (a device sync on CUDA) as boolean indexing does
        codes_x.masked_fill_((absmax_x == 0)[:, None], 0)
        if x.dtype == torch.float16:  # bitsandbytes' fused scaling writes float16: fine here
            return torch.ops.bitsandbytes.int8_scaled_mm.default(
                codes_x, self.weight, absmax_x, self.absmax, bias=bias, dtype=x.dtype
            )
        products = torch.ops.bitsandbytes.int8_linear_matmul.default(codes_x, self.weight)
        # bitsandbytes' default int8_mm_dequant, in float32: its CUDA kernel rounds through
        # float16 (inf past 65504) whatever the output dtype. 1 / 127^2 is 6.2000124e-05; the
        # literal is the one bitsandbytes' default (CPU) backend multiplies by, 1.8e-5
        # larger, kept for the same bits as its CPU path (its CUDA kernel writes 6.200012e-05).
        out = products * (absmax_x[:, None] * self.absmax[None, :])
        out.mul_(6.200124e-05)
        if bias is not None:
            out.add_(bias)
        return out.to(x.dtype)

    def _apply_matmul(self, x: Tensor, bias: Tensor | None) -> Tensor:
        check_linear_input(x, self.in_features)
        dtype = autocast_dtype(x, self.compute_dtype) or self.compute_dtype
        # reshape and cast only when needed: each is a node in the autograd graph otherwise
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        if torch.is_grad_enabled() and (
            x2.requires_grad or (bias is not None and bias.requires_grad) or functorch_active()
        ) and not torch.jit.is_tracing():  # jit.trace cannot record a custom backward
            out = _QuantizedMatmul.apply(x2, bias, self)
        else:  # nothing to differentiate: skip the autograd function's bookkeeping
            out = self._matmul_2d(x2, bias)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        """``y = x W^T + b`` for ``x`` of shape ``(*, in_features)``, in ``x``'s dtype.

        Under ``torch.autocast`` it computes in the autocast dtype and returns it, as
        ``nn.Linear`` does (the weight is decoded into that dtype).
        """
        out = self._apply_matmul(x, self.bias)
        if out.dtype == x.dtype or autocast_dtype(x, self.compute_dtype) is not None:
            return out
        return out.to(x.dtype)

    def matmul(self, x: Tensor) -> Tensor:
        """``x W^T`` without bias, in ``compute_dtype`` (under ``torch.autocast``: in its dtype);
        differentiable with respect to ``x`` only."""
        return self._apply_matmul(x, None)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of dequantized weights and of the matmul: one of :data:`COMPUTE_DTYPES`.
        Settable (the stored codes do not change); another value raises ``ValueError``."""
        state = self.__dict__  # layers pickled by older versions hold the plain attribute instead
        return cast(torch.dtype, state.get("_compute_dtype", state.get("compute_dtype")))

    @compute_dtype.setter
    def compute_dtype(self, value: torch.dtype) -> None:
        _check_compute_dtype(value)
        self._compute_dtype = value

    @property
    def int8_activations(self) -> bool:
        """int8 only: multiply with bitsandbytes' int8 kernel, the activations quantized to int8
        too (faster, but no longer exactly ``x @ dequantize()^T``; see docs/quantization.md).
        Default False. A 4-bit layer takes only False."""
        state = self.__dict__  # layers pickled by older versions hold the plain attribute instead
        return state.get("_int8_activations", state.get("int8_activations", False))

    @int8_activations.setter
    def int8_activations(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"int8_activations: expected a bool, got {value!r}")
        if value and self.scheme != "int8":
            raise ValueError(
                f"int8_activations: only an int8 layer has bitsandbytes' int8 kernel; this layer has "
                f"scheme={self.scheme!r}, so it takes only False"
            )
        self._int8_activations = value

    # ---- bookkeeping --------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held: codes, absmax, nested absmax, offset, code tables and bias."""
        tensors = list(self.parameters()) + list(self.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def _saved_scheme(self, state_dict: dict, prefix: str) -> str | None:
        """What ``state_dict`` says it was saved with: ``"scheme='nf4'"`` (or fp4, int8), another
        description when it is no scheme, None when it does not say (no ``weight`` nor ``code``).

        Read from the tensors: nf4 and fp4 store a packed uint8 ``weight`` and their 16 levels in
        ``code``; int8 stores an int8 ``weight`` and no ``code``; a float ``weight`` is no
        quantized state dict (an int8 layer would truncate it into codes). A uint8 ``weight`` without
        ``code`` reads as this layer's scheme if it is 4-bit (the key check reports the missing
        ``code``).
        """
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, Tensor) and weight.dtype not in (torch.int8, torch.uint8):
            return f"no quantization ('{prefix}weight' is {weight.dtype}, not int8 or uint8 codes)"
        code = state_dict.get(prefix + "code")
        if isinstance(code, Tensor):
            levels = code.detach().cpu().float()
            for scheme in ("nf4", "fp4"):
                expected = ref.four_bit_code(scheme)
                if levels.shape == expected.shape and torch.equal(levels, expected):
                    return f"scheme={scheme!r}"
            return f"4-bit levels '{prefix}code' of neither nf4 nor fp4"
        if not isinstance(weight, Tensor):
            return None
        if weight.dtype == torch.int8:
            return "scheme='int8'"
        return f"scheme={self.scheme!r}" if self.scheme != "int8" else "a 4-bit scheme (uint8 codes)"

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # checked before anything is copied, so that a refused load leaves the layer unchanged;
        # the key and shape checks alone let a float weight into int8 codes (truncated) and
        # report another scheme as missing/unexpected keys
        saved = self._saved_scheme(state_dict, prefix)
        if saved is not None and saved != f"scheme={self.scheme!r}":
            raise ValueError(
                f"state_dict: saved with {saved}, but this layer has scheme={self.scheme!r}; "
                "build the QuantizedLinear with the scheme the state_dict was saved with"
            )
        problems = self._state_dict_misfits(state_dict, prefix)
        if problems:
            settings = f"scheme={self.scheme!r}"
            if self.scheme != "int8":
                settings += f", blocksize={self.blocksize}, double_quant={self.double_quant}"
            raise ValueError(
                f"state_dict: does not fit this QuantizedLinear ({settings}): {'; '.join(problems)}; "
                "build it with the settings the state_dict was saved with (another blocksize or "
                "double_quant changes these tensors)"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if any(isinstance(state_dict.get(prefix + name), Tensor) for name in self._quantized_names()):
            self.version += 1
            # written in place into storage a wrapped module may share: whether all of its state
            # followed is bitsandbytes' business, so the layer no longer vouches for the module
            self._bnb_source = None

    def _quantized_names(self) -> list[str]:
        """The names of the persistent tensors that hold the quantized weight (all but the bias)."""
        return [
            name for name, tensor in [*self._parameters.items(), *self._buffers.items()]
            if tensor is not None and name != "bias" and name not in self._non_persistent_buffers_set
        ]

    def _state_dict_misfits(self, state_dict: dict, prefix: str) -> list[str]:
        """The tensors of ``state_dict`` that do not fit this layer's (shape, or dtype but for the
        bias): PyTorch copies every tensor whose shape fits before it reports the rest, which
        would leave codes of one layout with statistics of another (and write into a wrapped
        bitsandbytes module's storage). For the same reason the codes and their statistics load
        together or not at all; other missing and unexpected keys PyTorch reports itself."""
        problems = []
        quantized = self._quantized_names()
        present = [name for name in quantized if isinstance(state_dict.get(prefix + name), Tensor)]
        if present and len(present) != len(quantized):
            missing = [prefix + name for name in quantized if name not in present]
            problem = f"it holds {[prefix + name for name in present]} without {missing} (codes and statistics load together)"
            if any(key.startswith(prefix + "weight.") or key == prefix + "SCB" for key in state_dict):
                problem += (
                    "; it looks like a bitsandbytes module's state dict: load it into that module "
                    "and wrap the module with QuantizedLinear.from_bnb"
                )
            problems.append(problem)
        for name, tensor in [*self._parameters.items(), *self._buffers.items()]:
            value = state_dict.get(prefix + name)
            if tensor is None or not isinstance(value, Tensor):
                continue
            if value.shape != tensor.shape or (name != "bias" and value.dtype != tensor.dtype):
                problems.append(
                    f"'{prefix}{name}' is {tuple(value.shape)} {value.dtype}, "
                    f"this layer holds {tuple(tensor.shape)} {tensor.dtype}"
                )
        return problems

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> QuantizedLinear:
        # .to(device) moves every tensor; a dtype cast (.half(), .to(torch.bfloat16), .type())
        # must not round the float32 statistics or cast the codes, so buffers and the codes keep
        # their dtype (only the bias is cast).
        before = dict(self._buffers)
        codes = self.weight.detach()  # the old storage: the cast may write the parameter in place
        super()._apply(fn, *args, **kwargs)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        if self.weight.dtype != codes.dtype:  # Module.type() casts integer tensors too
            self.weight = nn.Parameter(codes.to(self.weight.device), requires_grad=False)
        self.version += 1
        if self.bnb_module is None:  # moved: do not keep the module's old storage alive
            self._bnb_source = None
        return self

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scheme={self.scheme!r}"
        )
        if self.scheme != "int8":
            text += f", blocksize={self.blocksize}, double_quant={self.double_quant}"
        return text + f", compute_dtype={self.compute_dtype}"


def _same_storage(a: Tensor | None, b: Tensor | None) -> bool:
    """Both None, or both tensors over the same memory."""
    if a is None or b is None:
        return a is None and b is None
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _undo_cpu_repack(data: Tensor, state: Any) -> tuple[Tensor, Tensor]:
    """Standard packed codes and float32 absmax of a weight in bitsandbytes' AVX512 CPU layout.

    The repacked weight is ``(out, in/2)`` uint8: the codes, viewed as ``(out/32, 32, in/2, 2)``,
    are transposed to ``(out/32, in/2, 32, 2)`` and each run of 64 codes is stored as 32 bytes,
    code ``j`` in the low nibble and code ``32 + j`` in the high nibble of byte ``j``. ``absmax``
    becomes bfloat16 of shape ``(in/blocksize, out)``.
    """
    out_f, half_in = data.shape
    block_n = 32
    raw = data.view(torch.uint8).reshape(-1, block_n)
    runs = torch.cat([raw & 0xF, raw >> 4], dim=1)
    codes = runs.reshape(out_f // block_n, half_in, block_n, 2).transpose(1, 2).reshape(out_f, 2 * half_in)
    absmax = state.absmax.t().reshape(-1).float()
    return ref.pack_4bit(codes), absmax
