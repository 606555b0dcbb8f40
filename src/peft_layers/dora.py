r"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024), at LoRA's cost.

With ``W' = W0 + s B A`` and ``n = ||W'||`` per output row (L2 over in_features, float32,
detached, clamped below at ``epsilon``), DoRA computes

    y = (m / n) * (x W'^T) + b

where ``m`` (out_features,) is the trainable magnitude, initialised to ``n`` so a fresh layer equals
its base. ``n`` is never computed from a materialised ``W'``; it comes from the factored identity

    n^2 = ||W0||^2 + 2 s rowsum(B * (A W0^T)^T) + s^2 rowsum((B (A A^T)) * B)

in which ``||W0||^2`` per row is cached (and refreshed whenever the base weight changes) and
``A W0^T`` is the base layer applied to the ``r`` rows of ``A``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn

from . import _row_blocks
from ._devices import widest_float
from ._row_blocks import DecodedInBlocks, RowBlocks
from ._warnings import warn as _warn
from .adapter import (
    autocast_enabled,
    autocast_off,
    class_path,
    has_hooks,
    optimizer_steps,
    overrides_linear_forward,
    plain_ops_only,
    version_key,
)
from .lora import (
    LoRALinear,
    _adapted_mm,
    _adapter_grads,
    _base_weight_blocks_for_backward,
    _cast,
    _gradient_dtype,
    _check_positive,
    _graph_freed_after_backward,
    _refuse_double_backward,
    _save_weight_or_key,
)

# the public names (the rest is internal, underscore or not); docs/api.md lists them all
__all__ = [
    "DoRALinear",
]


def norm_dtype_for(compute_dtype: torch.dtype) -> torch.dtype:
    """DoRA's norm is accumulated in float32, or float64 when the layer computes in float64 (its
    inputs, ``A W0^T`` among them, come in the compute dtype)."""
    return torch.promote_types(compute_dtype, torch.float32)


def factored_row_norm(
    base_row_norm_sq: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    base_times_A: Tensor,
    scaling: float,
    epsilon: float,
) -> Tensor:
    r"""Row norms of ``W' = W0 + s B A`` without forming ``W'``.

    .. math::
        n_i^2 = \|W_{0,i}\|^2 + \sum_k B_{ik}\,\big(2 s (A W_0^\top)_{ki} + s^2 (B A A^\top)_{ik}\big)

    Args:
        base_row_norm_sq: ``||W0_i||^2``, shape (out,), in the norm dtype (float32 or float64).
        lora_A: (r, in). lora_B: (out, r).
        base_times_A: ``A W0^T``, shape (r, out).
        scaling: ``s``. epsilon: lower clamp of ``n``.

    Returns:
        ``n``, shape (out,), in ``base_row_norm_sq``'s dtype, clamped to ``>= epsilon``. The sum
        runs in float64 (float32 on devices without it: MPS, Intel Arc): its inputs are
        ``(out, r)`` and ``(r, r)`` tensors, so this costs little, and the quadratic term's
        ``r`` summands ``s^2 B_ik (B A A^T)_ik`` can be far larger than their sum
        ``s^2 ||B_i A||^2`` when ``A``'s rows are nearly dependent (summed in float32, a norm
        was seen 120 ``eps32`` off). What remains is the rounding of the inputs, an absolute
        error of about ``eps32 * ||W0_i||^2`` in ``n_i^2`` for a float32 ``W0``: only a row that
        nearly cancels (``n_i << ||W0_i||``) notices it.
    """
    if autocast_enabled(base_row_norm_sq):  # the norm keeps its own dtype under autocast
        with autocast_off(base_row_norm_sq):
            return factored_row_norm(base_row_norm_sq, lora_A, lora_B, base_times_A, scaling, epsilon)
    dtype = base_row_norm_sq.dtype
    work = widest_float(base_row_norm_sq.device)
    a = lora_A.to(work)
    b = lora_B.to(work)
    gram = a @ a.t()
    # 2 s (A W0^T)^T + s^2 B (A A^T), then the row-wise dot with B
    mixed = torch.addmm(base_times_A.t().to(work), b, gram, beta=2 * scaling, alpha=scaling * scaling)
    norm_sq = base_row_norm_sq.to(work) + (b * mixed).sum(dim=1)
    # out of place: torch.export traces this into a graph that autograd differentiates, where an
    # in-place op after sqrt would break sqrt's backward (and these are (out,) vectors: cheap)
    return norm_sq.clamp_min(0).sqrt().to(dtype).clamp_min(epsilon)


def magnitude_gain(magnitude: Tensor, norm: Tensor) -> Tensor:
    """DoRA's per-row gain ``g = m / n`` in the norm's dtype (float32, or float64), kept there:
    see :func:`apply_gain` for why it never rounds to 16 bits."""
    return magnitude.to(norm.dtype) / norm


def apply_gain(z: Tensor, gain: Tensor, bias: Tensor | None = None, *, out: Tensor | None = None) -> Tensor:
    """``b + g * z`` in ``z``'s dtype, ``g`` (out,) scaling the columns of ``z`` (..., out);
    ``out=z`` computes in place.

    A 16-bit ``z`` takes it as ``z + (g - 1) * z``. ``g`` itself rounded to 16 bits would lose
    what DoRA learns: bfloat16's step above 1 is 2^-7, so every gain in [1, 1.0039) would act
    as exactly 1, and a small step of ``m`` would not reach the output. ``g - 1`` rounds to 16
    bits relative to its own size, so only the output's own rounding remains.
    """
    if z.dtype.itemsize >= 4:
        gain = _cast(gain, z.dtype)
        return torch.mul(z, gain, out=out) if bias is None else torch.addcmul(bias, z, gain, out=out)
    result = torch.addcmul(z, z, (gain - 1).to(z.dtype), out=out)
    return result if bias is None else result.add_(bias)


#: elements of a 16-bit ``W0`` cast to float32 at a time for the norm's terms (16 MiB)
NORM_BLOCK_ELEMENTS = 1 << 22


def _norm_row_blocks(weight: Tensor) -> Iterator[slice]:
    """Slices of ``weight``'s rows of at most :data:`NORM_BLOCK_ELEMENTS` elements (one row at
    least): the unit in which a 16-bit weight meets float32."""
    rows = max(1, NORM_BLOCK_ELEMENTS // max(1, weight.shape[1]))
    return (slice(start, start + rows) for start in range(0, weight.shape[0], rows))


def base_norm_terms(
    weight: Tensor, lora_A: Tensor, cached_row_norm_sq: Tensor | Callable[[], Tensor],
) -> tuple[Tensor, Tensor]:
    """``(||W0||^2 per row, A W0^T)`` for :func:`factored_row_norm`, in the norm dtype, for the
    ``W0`` the forward multiplies by (``weight``: in the compute dtype, or autocast's).

    A float32 (float64) ``W0`` gives ``W0 A^T`` in one GEMM and the cached row norms
    (``cached_row_norm_sq``, or a function giving them, called only then). A 16-bit ``W0`` is
    cast to float32 a block of rows at a time (:data:`NORM_BLOCK_ELEMENTS`, no float32 copy of
    the whole weight), and both terms come from those blocks: a product rounded to 16 bits
    carries an error of about ``eps16 ||W0_i||^2`` into ``n_i^2``, which swamps a row where
    ``W0 + s B A`` nearly cancels (measured: outputs off by 1e6 in bfloat16), and the row norms
    must be those of the same rounded ``W0``.
    """
    if autocast_enabled(weight):  # the terms keep their dtype under autocast
        with autocast_off(weight):
            return base_norm_terms(weight, lora_A, cached_row_norm_sq)
    dtype = norm_dtype_for(weight.dtype)
    a_t = _cast(lora_A, dtype).t()
    if weight.dtype == dtype:
        # W A^T runs about twice as fast as A W^T on CPU BLAS (skinny operand on the right)
        cached = cached_row_norm_sq if isinstance(cached_row_norm_sq, Tensor) else cached_row_norm_sq()
        return cached, (weight @ a_t).t()
    out_features = weight.shape[0]
    row_norm_sq = torch.empty(out_features, dtype=dtype, device=weight.device)
    base_times_A = torch.empty(out_features, a_t.shape[1], dtype=dtype, device=weight.device)
    for rows in _norm_row_blocks(weight):
        block = weight[rows].to(dtype)
        torch.mm(block, a_t, out=base_times_A[rows])
        torch.linalg.vector_norm(block, dim=1, out=row_norm_sq[rows])
    return row_norm_sq.square_(), base_times_A.t()


def _norm_terms_by_block(
    blocks: RowBlocks, lora_A: Tensor, cached_row_norm_sq: Tensor,
) -> tuple[Tensor, Tensor, RowBlocks]:
    """:func:`base_norm_terms` of a ``W0`` given as row blocks (:mod:`peft_layers._row_blocks`):
    ``(||W0||^2 per row, A W0^T, blocks)``, where the returned ``blocks`` pass the given ones
    through and fill the two terms in, a block's rows at a time, as they go by. The terms are
    complete once the blocks are consumed: the base GEMM and the norm then read each decoded
    block once (or the caller consumes them for the norm alone)."""
    dtype = norm_dtype_for(lora_A.dtype)
    row_norm_sq = lora_A.new_empty(cached_row_norm_sq.shape[0], dtype=dtype)
    base_times_A = lora_A.new_empty(cached_row_norm_sq.shape[0], lora_A.shape[0], dtype=dtype)

    def filling() -> RowBlocks:
        for rows, block in blocks:
            cached = cached_row_norm_sq if rows is None else cached_row_norm_sq[rows]
            block_norm_sq, block_times_A = base_norm_terms(block, lora_A, cached)
            target = slice(None) if rows is None else rows
            row_norm_sq[target] = block_norm_sq
            base_times_A[target] = block_times_A.t()
            yield rows, block

    return row_norm_sq, base_times_A.t(), filling()


def _update_and_norm_terms(
    x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, weight_fn: Callable[[], Tensor],
    cached_row_norm_sq: Tensor | Callable[[], Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, RowBlocks]:
    """``(z, t, ||W0||^2 per row, A W0^T, W0's row blocks)`` with ``z = x W0^T + s t B^T``,
    ``t = x A^T`` (:func:`~peft_layers.lora._adapted_mm`) and the norm's terms from
    :func:`base_norm_terms`, for 2-D ``x`` in the compute dtype and ``A``, ``B`` cast to it. The
    blocks are what the products read: the dense weight as one block, or the consumed blocks of
    a :class:`~peft_layers._row_blocks.DecodedInBlocks` one, which both products read block by
    block as it goes by (decoded once)."""
    blocks: RowBlocks
    if isinstance(weight_fn, DecodedInBlocks):
        cached = cached_row_norm_sq if isinstance(cached_row_norm_sq, Tensor) else cached_row_norm_sq()
        base_row_norm_sq, base_times_A, blocks = _norm_terms_by_block(weight_fn.blocks(), lora_A, cached)
    else:
        weight = weight_fn()
        base_row_norm_sq, base_times_A = base_norm_terms(weight, lora_A, cached_row_norm_sq)
        blocks = _row_blocks.whole(weight)
    z, t = _adapted_mm(x, x, lora_A, lora_B, None, scaling, blocks)
    return z, t, base_row_norm_sq, base_times_A, blocks


def _scale_rows_(weight: Tensor, gain: Tensor, *, divide: bool = False) -> Tensor:
    """``W_i *= g_i`` (``divide``: ``W_i /= g_i``) in place, for the merge's ``W`` (float32 or
    wider: :meth:`~peft_layers.adapter.AdapterMixin._merge_dtype`) and ``g`` in the norm's dtype."""
    gain = _cast(gain, weight.dtype)[:, None]
    return weight.div_(gain) if divide else weight.mul_(gain)


class _DoRAFunction(torch.autograd.Function):
    """DoRA's forward and backward on 2-D inputs with dropout inactive.

    Forward: ``z = x W^T + s (x A^T) B^T``, ``n`` from :func:`factored_row_norm`, ``g = m / n``,
    ``y = b + g * z`` in one fused op.
    Backward, with ``G`` the output gradient and ``n`` constant (detached):
    ``dm = sum_rows(G * z) / n``, ``Gs = G * g``, ``dB = s Gs^T (x A^T)``, ``dT = s Gs B``,
    ``dA = dT^T x``, ``dx = Gs W + dT A`` (accumulated in place), ``db = sum_rows(G)``.
    ``W`` is saved for a dense base and decoded again for a quantized one, as in
    :class:`~peft_layers.lora._LoRAFunction` (:func:`~peft_layers.lora._save_weight_or_key`);
    ``A`` and ``B`` come in their own dtype, as there, and ``n`` comes from
    :func:`base_norm_terms` of the same ``W``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        lora_A: Tensor,
        lora_B: Tensor,
        magnitude: Tensor,
        bias: Tensor | None,
        scaling: float,
        epsilon: float,
        cached_row_norm_sq: Tensor,
        weight_fn: Callable[[], Tensor],
        weight_key_fn: Callable[[], tuple] | None,
    ) -> Tensor:
        a, b = _cast(lora_A, x.dtype), _cast(lora_B, x.dtype)  # backward returns their gradients in their dtype
        z, t, base_row_norm_sq, base_times_A, weight = _update_and_norm_terms(
            x, a, b, scaling, weight_fn, cached_row_norm_sq,
        )
        norm = factored_row_norm(base_row_norm_sq, a, b, base_times_A, scaling, epsilon)
        gain = magnitude_gain(magnitude, norm)
        out = apply_gain(z, gain, bias)
        _save_weight_or_key(ctx, [x, t, z, lora_A, lora_B, gain, norm], weight, weight_key_fn)
        del weight
        ctx.scaling = scaling
        ctx.weight_fn = weight_fn
        ctx.magnitude_dtype = magnitude.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        _refuse_double_backward()
        saved = ctx.saved_tensors
        x, t, z, lora_A, lora_B, gain, norm = saved[:7]
        need_x, need_A, need_B, need_m, need_bias = ctx.needs_input_grad[:5]
        grad_x = grad_m = grad_bias = None
        if need_bias:
            grad_bias = grad_out.sum(0)
        compute_dtype = grad_out.dtype
        grad = _cast(grad_out, _gradient_dtype(compute_dtype, lora_A))  # sums over tokens: see there
        # z is read only here: when the graph goes after this backward, G * z and then G * g are
        # written over it, which saves two output-sized allocations (on a CPU, fresh pages cost
        # page faults: about 3% of a DoRA step at 1024, see docs/benchmarks.md)
        reuse_z = z.dtype == grad.dtype and _graph_freed_after_backward(grad)
        if need_m:
            product = z.mul_(grad) if reuse_z else grad * z
            grad_m = (product.sum(0).to(norm.dtype) / norm).to(ctx.magnitude_dtype)
        grad_z = apply_gain(grad, gain, out=z if reuse_z else None)
        grad_t, grad_A, grad_B = _adapter_grads(grad_z, x, t, lora_A, lora_B, ctx.scaling, need_A, need_B)
        if need_x:  # the small product first, the big GEMM accumulating into it (_adapted_mm)
            grad_t, grad_z = _cast(grad_t, compute_dtype), _cast(grad_z, compute_dtype)
            into = grad_t @ _cast(lora_A, compute_dtype)
            grad_x = _row_blocks.grad_times_weight(grad_z, _base_weight_blocks_for_backward(ctx, saved), into)
        return grad_x, grad_A, grad_B, grad_m, grad_bias, None, None, None, None, None


class DoRALinear(LoRALinear):
    r"""A drop-in ``nn.Linear`` with DoRA: LoRA's direction update plus a per-row magnitude.

    .. math::
        W' = W_0 + s B A,\quad n = \mathrm{sg}(\max(\|W'\|_{\text{row}}, \epsilon)),\quad
        y = \frac{m}{n} \odot (x W'^\top) + b

    With dropout active (training, ``dropout > 0``), the update reads ``d = dropout(x)``::

        y = x W0^T + b + (m/n - 1) * (d W0^T) + (m/n) * s * (d A^T) B^T

    (the official DoRA code's and Hugging Face PEFT's form), which costs one more base matmul.
    Without dropout, the base output is reused and ``n`` costs one ``r``-row pass of the base.

    Takes :class:`LoRALinear`'s arguments plus ``epsilon`` (> 0), the lower clamp of ``n``.

    Attributes:
        magnitude: ``m``, (out_features,), initialised to ``||W0 + s B A||`` per row.
    """

    adapter_parameter_names: tuple[str, ...] = ("lora_A", "lora_B", "magnitude")
    magnitude: nn.Parameter
    #: when True, a no-grad forward that cannot cache its gain (tracing) or will not reuse it (train
    #: mode) computes ``A W0^T`` in the same base call as the input (rows stacked), which saves a
    #: pass over a base whose weight has to be decoded (quantized bases).
    _norm_rides_with_input: bool = False
    _merges_sharded = False  # the merge reads whole rows of W0 + s B A
    _merge_is_one_addmm = False  # it also scales rows by m / ||W'||: in float32, then rounded once

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        epsilon: float = 1e-8,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> None:
        # device named in the signature: torch.nn.utils.skip_init looks for it there
        super().__init__(in_features, out_features, epsilon=epsilon, device=device, **kwargs)

    def _init_adapter(self, base_layer: nn.Module, *, epsilon: float = 1e-8, **kwargs: Any) -> None:
        self.epsilon = epsilon
        self._base_row_norm_cache: tuple[tuple, Tensor] | None = None
        self._merge_gain: Tensor | None = None
        self._merge_zero_rows: tuple[Tensor, Tensor] | None = None
        self._inference_gain_cache: tuple[tuple, Tensor] | None = None
        super()._init_adapter(base_layer, **kwargs)
        if overrides_linear_forward(base_layer):
            _warn(
                f"{type(self).__name__}: base_layer is a {class_path(base_layer)}, an nn.Linear with a forward of its "
                "own, which an unmerged DoRA layer does not call: DoRA's output (m / n) (x W'^T) + b "
                "and its norm are computed from base_layer.weight (the norm needs W0), so the layer "
                "is DoRA over x W0^T + b, not over that forward (merged or disabled, it calls the "
                "forward; where the forward is x W^T + b, nothing differs). Use method 'lora', which "
                "calls it"
            )

    _meta_note = " after loading the base weights (the magnitude is ||W0|| per row)"

    def _create_adapter_parameters(self, device: torch.device, dtype: torch.dtype) -> None:
        super()._create_adapter_parameters(device, dtype)
        self.magnitude = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))

    def reset_adapter_parameters(self) -> None:
        """Re-initialise ``A``, ``B`` as ``init`` says, then ``m = ||W0 + s B A||`` per row."""
        super().reset_adapter_parameters()
        with torch.no_grad():
            self.magnitude.copy_(self.weight_norm())

    @property
    def epsilon(self) -> float:
        """The floor of the weight norm, ``n = max(||W'||, epsilon)``: a finite number > 0,
        checked when set."""
        return cast(float, self._scaling_setting("epsilon"))

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        _check_positive("epsilon", value)
        self._store_setting("epsilon", float(value))

    # ---- the norm -------------------------------------------------------------------------
    def base_row_norm_sq(self) -> Tensor:
        """``||W0||^2`` per output row in the norm dtype; cached, refreshed when the base changes.

        The cache is keyed by the weight tensor itself (a weak reference), its storage, autograd
        version counter, dtype, device and shape (by the ``QuantizedLinear`` and its ``version``
        for a quantized base), so in-place ops, ``load_state_dict`` and replacing the parameter
        refresh it; ``.to()`` and other casts drop it (:meth:`_apply`). A write through
        ``weight.data`` bypasses the version counter: call :meth:`reset_norm_cache` after one.
        """
        key = self._base_weight_key()
        cached = self.__dict__.get("_base_row_norm_cache")  # none in layers pickled before it
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():  # a large quantized W0 on the CPU a block of rows at a time
            blocks = _row_blocks.weight_blocks(self._weight_fn(self.compute_dtype))
            norm_sq = torch.cat([
                torch.linalg.vector_norm(block, dim=1, dtype=norm_dtype_for(block.dtype)).square()
                for _, block in blocks
            ])
        if key is not None:  # no key (tracing, torch.func, inference tensors): nothing is stored
            self._base_row_norm_cache = (key, norm_sq)  # one store: never a norm under another key
        return norm_sq

    def reset_norm_cache(self) -> None:
        """Drop the cached norms (``||W0||^2``, and ``m / n`` of the no-grad forward); the next
        forward recomputes them."""
        self._base_row_norm_cache = None
        self._inference_gain_cache = None

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> DoRALinear:
        super()._apply(fn, *args, **kwargs)
        # a cast replaces the weight's storage without bumping its version, and a round trip
        # (float -> bf16 -> float) can get the old address back: the cache keys would match
        # values that changed
        self.reset_norm_cache()
        device = self.magnitude.device
        held = self._merge_gain
        if held is not None and held.is_meta and device.type != "meta":
            # to_empty() after a move to meta: the merge's gain holds no values to move, as the
            # merged weight holds none; unmerge() is refused until a merge of loaded values
            self._merged_values_replaced()
        if self._merge_gain is not None:
            self._merge_gain = self._merge_gain.to(device)
        if self._merge_zero_rows is not None:
            rows, saved = self._merge_zero_rows
            self._merge_zero_rows = (rows.to(device), saved.to(device))
        return self

    def _merged_values_replaced(self) -> None:
        # the per-row gain m / ||W'|| of a merge is in no state dict (it needs W', which the merged
        # weight no longer holds): a merged layer that loaded other values cannot be unmerged
        super()._merged_values_replaced()
        self._merge_gain = None
        self._merge_zero_rows = None

    def weight_norm(self) -> Tensor:
        """``n = max(||W0 + s B A||, epsilon)`` per output row, detached, from the factored form."""
        if self.merged:
            raise ValueError("weight_norm(): the layer is merged, W0 is not available; unmerge() first")
        with torch.no_grad(), autocast_off(self.lora_A):
            lora_A, lora_B, _ = self._adapter_tensors(self.compute_dtype)
            return self._row_norm(lora_A, lora_B, self._weight_fn(self.compute_dtype))

    def _row_norm(self, lora_A: Tensor, lora_B: Tensor, weight_fn: Callable[[], Tensor]) -> Tensor:
        """:func:`factored_row_norm` of the ``W0`` that ``weight_fn`` gives (as the forward
        multiplies by it; a :class:`~peft_layers._row_blocks.DecodedInBlocks` one a block of rows
        at a time) with this layer's ``s`` and ``epsilon`` (:func:`base_norm_terms`)."""
        if isinstance(weight_fn, DecodedInBlocks):
            base_row_norm_sq, base_times_A, blocks = _norm_terms_by_block(
                weight_fn.blocks(), lora_A, self.base_row_norm_sq(),
            )
            for _ in blocks:  # fills the two terms in
                pass
        else:
            base_row_norm_sq, base_times_A = base_norm_terms(weight_fn(), lora_A, self.base_row_norm_sq)
        return factored_row_norm(base_row_norm_sq, lora_A, lora_B, base_times_A, self.scaling, self.epsilon)

    # ---- the delta ------------------------------------------------------------------------
    def delta_weight(self) -> Tensor:
        """``(m/n - 1) W0 + (m/n) s B A``, so that ``W0 + delta = (m/n) W'``; (out, in)."""
        if self.merged:
            raise ValueError("delta_weight(): the layer is merged, W0 is not available; unmerge() first")
        gain = magnitude_gain(self.magnitude, self.weight_norm())
        dtype = self.lora_A.dtype
        # g - 1 cast after the subtraction: it keeps its digits in a 16-bit dtype (apply_gain)
        base = self._compute_weight().to(dtype)
        return (gain - 1).to(dtype)[:, None] * base + gain.to(dtype)[:, None] * super().delta_weight()

    def _merge_weight_(self, weight: Tensor) -> None:
        self._add_lora_product_(weight, self.scaling)
        norm = torch.linalg.vector_norm(weight, dim=1, dtype=norm_dtype_for(weight.dtype))
        gain = self.magnitude.to(norm.dtype) / norm.clamp_min(self.epsilon)
        # a row with m = 0 merges to zeros, as does one whose gain is 0 or subnormal in the dtype
        # the layer stores (its bits are lost; ``weight`` itself is the wider merge dtype); keep
        # its W' so that unmerge() can restore it (a meta weight has no values, hence no such rows)
        stored = self.compute_dtype
        lost = gain.to(stored).abs() < torch.finfo(stored).tiny
        zero = None if weight.is_meta else lost.nonzero().flatten()
        self._merge_zero_rows = (zero, weight[zero].clone()) if zero is not None and zero.numel() else None
        self._merge_gain = gain
        _scale_rows_(weight, gain)

    def _check_unmergeable(self) -> None:
        if self.merged and self._merge_gain is None:
            raise ValueError(
                "unmerge(): this merged DoRA layer loaded a state dict (or was emptied by to_empty()) "
                "after its merge, and the merge's per-row gain m / ||W0 + s B A|| is in no state dict, "
                "so W0 cannot be recovered; load state dicts into unmerged layers (merge after loading)"
            )

    def _unmerge_weight_(self, weight: Tensor) -> None:
        gain = self._merge_gain
        assert gain is not None, "unmerge() checks _check_unmergeable() first"
        # rows whose gain is 0 in this dtype are restored below: divide them by 1, not 0
        _scale_rows_(weight, torch.where(gain.to(weight.dtype) == 0, 1.0, gain), divide=True)
        if self._merge_zero_rows is not None:
            rows, saved = self._merge_zero_rows
            weight[rows] = saved.to(weight.dtype)  # the layer may have been cast since the merge
        self._add_lora_product_(weight, -self.scaling, self._factors_as_merged())
        self._merge_gain = None
        self._merge_zero_rows = None

    # ---- forward -------------------------------------------------------------------------
    def _adapter_forward(self, x: Tensor) -> Tensor:
        if has_hooks(self.base_layer):
            self._warn_base_hooks_skipped()
        plain = self._dropout_active() or plain_ops_only()
        if not plain and torch.is_grad_enabled() and not self._base_weight_trainable():
            return _DoRAFunction.apply(  # A and B in their own dtype: it casts them
                x, self.lora_A, self.lora_B, self.magnitude, self._bias_in(x.dtype), self.scaling,
                self.epsilon, self.base_row_norm_sq(), self._weight_fn(x.dtype), self._refetch_key_fn(),
            )
        lora_A, lora_B, bias = self._adapter_tensors(x.dtype)
        if plain or torch.is_grad_enabled():  # dropout, torch.func, or a trainable base weight
            return self._dropout_forward(x, lora_A, lora_B, bias)
        return self._inference_forward(x, lora_A, lora_B, bias)

    def _runs_base_hooks(self) -> bool:
        return False  # the norm needs W0 itself: hooks on the base are skipped, with a warning

    def _warn_base_hooks_skipped(self) -> None:
        _warn(
            f"{type(self).__name__}: base_layer has hooks of its own, which an unmerged DoRA layer "
            "does not run: it computes x W0^T and the row norms of W0 from base_layer.weight itself "
            "(the norm needs W0). Register activation hooks on the DoRA layer instead; hooks that "
            "move or recompute the weight (accelerate's offloading, the deprecated "
            "torch.nn.utils.weight_norm) are not supported, use torch.nn.utils.parametrize for the "
            "latter. Merged or disabled, the layer calls base_layer and its hooks run.",
        )

    def _inference_gain_key(self, dtype: torch.dtype) -> tuple | None:
        """What the no-grad gain ``m / n`` in ``dtype`` depends on: the base, A, B and m (their
        :func:`~peft_layers.adapter.version_key`), s, epsilon, and the process's optimizer step
        count; None when one of them has no key (an inference tensor, tracing)."""
        parts = (
            self._base_weight_key(),
            version_key(self.lora_A), version_key(self.lora_B), version_key(self.magnitude),
        )
        if any(part is None for part in parts):
            return None
        # version_key counts optimizer steps only while a tensor requires grad, and a fused
        # optimizer writes without bumping the version: a gain cached while the adapter was
        # frozen came back after unfreezing, fused steps and freezing again. Training forwards
        # never read this cache, so the count costs one recomputation per step at most.
        return (*parts, optimizer_steps(), self.scaling, self.epsilon, dtype)

    def _inference_forward(self, x: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Tensor | None) -> Tensor:
        # Without grad, A, B and m only change between calls through an optimizer step or a load,
        # both of which bump their version counters; so m / n is kept until they (or the base)
        # change. Serving an unmerged adapter (a quantized base cannot merge without loss) then
        # costs no extra pass over the base. A training step never uses this cache.
        key = self._inference_gain_key(x.dtype)
        cache = self._inference_gain_cache
        # A's rows ride with x only where the base computes in the norm's dtype: a 16-bit
        # A W0^T would round the norm (see base_norm_terms)
        rides = self._norm_rides_with_input and x.dtype == norm_dtype_for(x.dtype)
        # in training, a layer whose A rides neither reads nor fills the cache: the same state
        # must give the same bits whatever calls came before (a copy has no cache), and a gain
        # from the [x; A] product rounds otherwise than one from the eval path
        if key is not None and cache is not None and cache[0] == key and not (rides and self.training):
            gain = cache[1]
            z = self._base_plus_update(x, lora_A, lora_B)
        else:
            if rides and (key is None or self.training):
                # nothing can be cached (every call takes this path and rounds alike), or the
                # adapter changes every step (the no-grad first pass of reentrant checkpointing)
                both = self._base_matmul(torch.cat([x, lora_A]))
                z, base_times_A = both[: x.shape[0]], both[x.shape[0]:]
                self._add_update_(z, x, lora_A, lora_B)
                norm = factored_row_norm(
                    self.base_row_norm_sq(), lora_A, lora_B, base_times_A, self.scaling, self.epsilon,
                )
                gain = magnitude_gain(self.magnitude, norm)  # not cached (above)
            else:
                # two products, not one over the rows of [x; A]: a GEMM over more rows rounds
                # x's rows differently, and the calls that find the gain cached must give the
                # same output as this one (eval mode)
                z, norm = self._base_plus_update_and_norm(x, lora_A, lora_B)
                gain = magnitude_gain(self.magnitude, norm)
                self._inference_gain_cache = None if key is None else (key, gain)
        return apply_gain(z, gain, bias, out=z)

    def _base_plus_update(self, x: Tensor, lora_A: Tensor, lora_B: Tensor) -> Tensor:
        """``x W0^T + s (x A^T) B^T`` without autograd (``z = x W'^T``)."""
        weight_fn = self._inference_weight_fn(x)
        if weight_fn is None:
            return self._add_update_(self._base_matmul(x), x, lora_A, lora_B)
        return _adapted_mm(x, x, lora_A, lora_B, None, self.scaling, _row_blocks.weight_blocks(weight_fn))[0]

    def _add_update_(self, z: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor) -> Tensor:
        """``z += s (x A^T) B^T`` in place (``z``: the base product ``x W0^T``, no autograd)."""
        return z.addmm_(x @ lora_A.t(), lora_B.t(), alpha=self.scaling)

    def _base_plus_update_and_norm(self, x: Tensor, lora_A: Tensor, lora_B: Tensor) -> tuple[Tensor, Tensor]:
        """``(x W0^T + s (x A^T) B^T, n)`` without autograd; ``z`` has the bits of
        :meth:`_base_plus_update`. A quantized ``W0`` is decoded once for both."""
        weight_fn = self._inference_weight_fn(x)
        if weight_fn is None:  # the base multiplies without a decoded weight: decode one for n
            norm = self._row_norm(lora_A, lora_B, self._weight_fn(x.dtype))
            return self._base_plus_update(x, lora_A, lora_B), norm
        z, _, base_row_norm_sq, base_times_A, _ = _update_and_norm_terms(
            x, lora_A, lora_B, self.scaling, weight_fn, self.base_row_norm_sq,
        )
        return z, factored_row_norm(base_row_norm_sq, lora_A, lora_B, base_times_A, self.scaling, self.epsilon)

    def _dropout_forward(self, x: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Tensor | None) -> Tensor:
        # y = x W0^T + b + (g - 1) (d W0^T) + g s (d A^T) B^T, with plain autograd
        base_out = self._base_matmul(x)
        # n is detached: no gradient flows through the norm. torch.jit.trace records ops but not
        # no_grad blocks, so the inputs are detached too (a 16-bit W0's norm uses out= products,
        # which a graph with gradients cannot run) and so is the result
        with torch.no_grad():
            norm = self._row_norm(lora_A.detach(), lora_B.detach(), self._weight_fn(x.dtype))
        norm = norm.detach()
        # the update and the gain in the dtype the adapter's gradients need (float32 over a
        # float16 computation, see lora._gradient_dtype); the caller casts the output back
        dtype = _gradient_dtype(x.dtype, self.lora_A)
        if dtype != x.dtype:  # the adapters' own dtype: the parameters themselves
            lora_A, lora_B = self.lora_A, self.lora_B
        gain = magnitude_gain(self.magnitude, norm)
        if self._dropout_active():
            x_drop = self.lora_dropout(x)
            base_drop = self._base_matmul(x_drop)
        else:
            x_drop, base_drop = x, base_out
        update = (x_drop.to(dtype) @ lora_A.t()) @ lora_B.t()
        # g - 1 cast after the subtraction: it keeps its digits in a 16-bit dtype (apply_gain)
        out = base_out + (gain - 1).to(dtype) * base_drop + gain.to(dtype) * self.scaling * update
        return out + bias if bias is not None else out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, epsilon={self.epsilon:g}"
