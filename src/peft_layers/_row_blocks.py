"""Products with a base weight ``W`` (out, in) that is decoded a block of rows at a time.

A quantized base stores codes, not ``W``: every product decodes it again. Decoded whole, a large
``W`` is a fresh allocation each time (on the CPU, glibc maps anything over 32 MiB anew and
returns it on free, so each decode of a 4096 x 4096 float32 weight page-faults 64 MiB) and is
written out to memory only to be read back by the GEMM. Decoded in row blocks of a few MiB, each
block is reused memory and is multiplied while it is still in cache (measured in
docs/quantization.md: a 4096 x 4096 NF4 forward in 0.69x the time, the weight never whole in
memory).

``blocks`` below is an iterable of ``(rows, W[rows])`` pairs covering ``W``'s rows in order;
``rows`` is a slice, or None for a single block holding all of ``W``. A single block computes
exactly what the unblocked product computes (the same call).

- ``x W^T``: each block gives the columns ``rows`` of the output (``x W[rows]^T``), the same
  dot products as the whole GEMM.
- ``G W``: a sum over the blocks (``G[:, rows] W[rows]``), accumulated in place: the same sum,
  grouped by block (rounding differs in the last bits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Union

import torch
from torch import Tensor

#: ``(rows, W[rows])`` pairs covering ``W`` in order (``rows`` None: the whole weight)
RowBlocks = Iterable[tuple[Union[slice, None], Tensor]]


def whole(weight: Tensor) -> RowBlocks:
    """``weight`` as a single block."""
    return ((None, weight),)


class DecodedInBlocks:
    """A base weight the fused functions fetch a block of rows at a time.

    ``blocks()`` decodes ``W`` block by block (one or two blocks alive at a time). Calling the
    object decodes it whole, so that it is still a weight function for a consumer that needs all
    of ``W`` at once (none of the layers' own paths does). A dense base's weight function is a
    plain function; :func:`weight_blocks` tells them apart.
    """

    def __init__(self, whole_fn: Callable[[], Tensor], blocks_fn: Callable[[], RowBlocks]) -> None:
        self.whole_fn = whole_fn
        self.blocks_fn = blocks_fn

    def __call__(self) -> Tensor:
        return self.whole_fn()

    def blocks(self) -> RowBlocks:
        return self.blocks_fn()


def weight_blocks(weight_fn: Callable[[], Tensor]) -> RowBlocks:
    """The row blocks of the weight ``weight_fn`` gives: its own for :class:`DecodedInBlocks`
    (decoded as they are consumed), else one block, fetched now."""
    if isinstance(weight_fn, DecodedInBlocks):
        return weight_fn.blocks()
    return whole(weight_fn())


def single_block(blocks: RowBlocks) -> Tensor:
    """The whole weight of a single-block ``blocks`` (a dense base's)."""
    ((rows, weight),) = blocks
    assert rows is None, "a dense base gives its weight as one block"
    return weight


def linear(x: Tensor, blocks: RowBlocks, bias: Tensor | None, out_features: int) -> Tensor:
    """``x W^T + b`` (``F.linear``) for 2-D ``x``, a block of output columns at a time."""
    out: Tensor | None = None
    for rows, block in blocks:
        if rows is None:
            return torch.nn.functional.linear(x, block, bias)
        if out is None:
            out = x.new_empty(x.shape[0], out_features)
        if bias is None:
            torch.mm(x, block.t(), out=out[:, rows])
        else:
            torch.addmm(bias[rows], x, block.t(), out=out[:, rows])
    assert out is not None, "blocks covers W's rows"
    return out


def add_x_wt_(out: Tensor, x: Tensor, blocks: RowBlocks) -> Tensor:
    """``out += x W^T`` in place, a block of ``out``'s columns at a time; returns ``out``."""
    for rows, block in blocks:
        (out if rows is None else out[:, rows]).addmm_(x, block.t())
    return out


def grad_times_weight(grad: Tensor, blocks: RowBlocks, out: Tensor | None = None) -> Tensor:
    """``G W`` for the output gradient ``G`` (N, out), or ``out += G W`` in place when ``out`` is
    given: one product per block, ``G[:, rows] W[rows]``, summed."""
    for rows, block in blocks:
        part = grad if rows is None else grad[:, rows]
        out = part @ block if out is None else out.addmm_(part, block)
    assert out is not None, "blocks covers W's rows"
    return out

