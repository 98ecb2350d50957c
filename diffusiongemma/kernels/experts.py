"""The experts' grouped products, and the switch that makes every row's result independent of the others.

`grouped_linear` multiplies rows sorted by expert with their expert's weight. Where it runs:
- the fused Triton kernel on CUDA where autograd records nothing (`fused.grouped_linear`): its tiles are
  fixed and never sum across rows, so each row's bits are its own whatever else is in the call;
- `F.grouped_mm` elsewhere, the reference's operation and bits. Its kernel depends on how many rows each
  expert gets, so a row's bits can depend on the other rows in the call;
- inside `row_independent()`, fixed tiles of `ROW_TILE` rows instead, each a product of the same shape,
  so that a row's bits do not depend on the other rows: what the server needs for a request to get the
  same answer alone or in any batch. The tiles' products sum in other pieces than `F.grouped_mm`'s, so the
  last bits differ from the reference's.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

from . import fused
from .quantized import QuantizedWeight

# Rows per tile: each expert's rows are padded to a multiple of it. Small, because at batch 1 an expert of
# the small models gets a handful of rows, and padding is wasted work.
ROW_TILE = 16

_mode = threading.local()


@contextlib.contextmanager
def row_independent():
    """Within it (in this thread), every row of the experts' products gets the bits it gets alone."""
    before = getattr(_mode, "row_independent", False)
    _mode.row_independent = True
    try:
        yield
    finally:
        _mode.row_independent = before


def rows_are_independent() -> bool:
    return getattr(_mode, "row_independent", False)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows of x [rows, in], sorted by expert, times their expert's weight [E, out, in] transposed; `ends`
    [E] (int32) says where each expert's rows end. A quantized weight (`QuantizedWeight`) is read as codes by
    the fused kernel where it can (`fused.reads_codes`), and elsewhere dequantized to x's dtype first, so every
    path computes with the rounded weights."""
    if isinstance(weight, QuantizedWeight):
        if fused.takes(x) and fused.reads_codes(weight.weight, weight.weight_scale):
            return fused.grouped_linear(x, weight.weight, ends, weight.weight_scale)
        weight = weight.dequantize(x.dtype)
    if fused.takes(x, weight):
        return fused.grouped_linear(x, weight, ends)
    if rows_are_independent():
        return _tiled(x, weight, ends)
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=ends)
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for expert, end in enumerate(ends.tolist()):
        if end > start:
            torch.mm(x[start:end], weight[expert].t(), out=out[start:end])
        start = end
    return out


def _tiled(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """`grouped_linear` in tiles: each expert's rows are copied into tiles of `ROW_TILE` rows (the last
    padded with zeros), and an expert's tiles are one batched product, weight times tile transposed, of
    same-shaped matrices, each computed alone (measured on the CPU at the engine's shapes: an entry's bits
    do not change with the number of tiles, as a matrix product's change with its number of rows). The
    weight comes first because its rows are then read as stored: with the tile first, the batched product
    reads the weight transposed, at about half the speed."""
    rows, inner = x.shape
    width = weight.shape[1]
    counts = torch.diff(ends, prepend=ends.new_zeros(1)).long()
    tiles = (counts + ROW_TILE - 1) // ROW_TILE
    padded_starts = (torch.cumsum(tiles, 0) - tiles) * ROW_TILE
    starts = ends.long() - counts
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts)
    slots = torch.arange(rows, device=x.device) - starts[expert_of_row] + padded_starts[expert_of_row]
    padded = x.new_zeros(int(tiles.sum()) * ROW_TILE, inner)
    padded.index_copy_(0, slots, x)
    transposed_tiles = padded.view(-1, ROW_TILE, inner).transpose(1, 2)
    out = x.new_empty(transposed_tiles.shape[0], width, ROW_TILE)
    first = 0
    for expert, count in enumerate(tiles.tolist()):
        if count:
            torch.bmm(weight[expert].expand(count, width, inner), transposed_tiles[first:first + count],
                      out=out[first:first + count])
            first += count
    # Row r of the result is column slots[r] % ROW_TILE of tile slots[r] // ROW_TILE.
    return out[slots // ROW_TILE, :, slots % ROW_TILE]
