"""The encoder's key/value cache and the attention masks that follow from it.

Each layer keeps its keys and values in one buffer with spare room at the end. The encoder appends
committed tokens there; the decoder writes the canvas's keys and values into the spare room for the
duration of one forward pass and attends to prefix + canvas as one contiguous view, so no denoising
step concatenates the prefix again.

Sliding layers only need the last `sliding_window - 1` prefix tokens (the decoder sees exactly those,
as the reference's default cache does), so older ones are dropped when the buffer fills. Every mask is
written in absolute token indices, which is why results do not depend on where in the buffer a token
sits.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .config import DiffusionGemmaTextConfig


class LayerCache:
    def __init__(self, is_sliding: bool, sliding_window: int):
        self.is_sliding = is_sliding
        # A sliding layer never looks further back than `window - 1` tokens before the new ones.
        self.keep = sliding_window - 1
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.start = 0  # absolute index of the token in buffer slot 0
        self.used = 0  # slots holding committed tokens

    @property
    def length(self) -> int:
        return self.start + self.used

    def _reserve(self, incoming: torch.Tensor, room: int) -> None:
        """Make space for `room` more slots after the committed ones."""
        batch, heads, _, dim = incoming.shape
        if self.keys is not None and self.used + room <= self.keys.shape[2]:
            return
        drop = max(self.used - self.keep, 0) if self.is_sliding else 0
        kept = self.used - drop
        capacity = kept + room
        if not self.is_sliding:
            capacity = max(capacity, 2 * (self.keys.shape[2] if self.keys is not None else 0))
        keys = incoming.new_empty(batch, heads, capacity, dim)
        values = incoming.new_empty(batch, heads, capacity, dim)
        if kept:
            keys[:, :, :kept] = self.keys[:, :, drop:self.used]
            values[:, :, :kept] = self.values[:, :, drop:self.used]
        self.keys, self.values = keys, values
        self.start += drop
        self.used = kept

    def _write(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        """Writes after the committed tokens; returns (keys, values, absolute index of the first key) over
        what the new tokens may attend to. Sliding layers return exactly the `window - 1` tokens before the
        new ones, as the reference's cache does: attending over more keys, even masked ones, would change
        the kernel's summation order and with it the last bits."""
        count = keys.shape[2]
        self._reserve(keys, room)
        self.keys[:, :, self.used:self.used + count] = keys
        self.values[:, :, self.used:self.used + count] = values
        first = max(self.used - self.keep, 0) if self.is_sliding else 0
        end = self.used + count
        return self.keys[:, :, first:end], self.values[:, :, first:end], self.start + first

    def append(self, keys: torch.Tensor, values: torch.Tensor, canvas_room: int):
        """Commits new tokens (the encoder)."""
        visible = self._write(keys, values, keys.shape[2] + canvas_room)
        self.used += keys.shape[2]
        return visible

    def with_canvas(self, keys: torch.Tensor, values: torch.Tensor):
        """Prefix + canvas for one decoder pass, without committing the canvas."""
        return self._write(keys, values, keys.shape[2])


class DifferentiableLayerCache:
    """The training cache of one layer: the same answers as `LayerCache`, built by concatenation instead
    of writes into a shared buffer, because autograd refuses to differentiate through tensors that were
    later overwritten in place (a canvas pass would overwrite what the encoder's backward needs)."""

    def __init__(self, is_sliding: bool, sliding_window: int):
        self.is_sliding = is_sliding
        self.keep = sliding_window - 1
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def with_canvas(self, keys: torch.Tensor, values: torch.Tensor):
        if self.keys is None:
            return keys, values, 0
        first = max(self.length - self.keep, 0) if self.is_sliding else 0
        return (torch.cat([self.keys[:, :, first:], keys], dim=2), torch.cat([self.values[:, :, first:], values], dim=2),
                first)

    def append(self, keys: torch.Tensor, values: torch.Tensor, canvas_room: int):
        visible = self.with_canvas(keys, values)
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys], dim=2)
        self.values = values if self.values is None else torch.cat([self.values, values], dim=2)
        return visible


class KVCache:
    """Per-layer keys and values of every token the encoder has committed. `differentiable=True` gives the
    training cache, through which gradients flow from the decoder back into the encoder."""

    def __init__(self, config: DiffusionGemmaTextConfig, canvas_length: int = 0, differentiable: bool = False):
        self.config = config
        # Room kept free after the prefix so that a canvas pass needs no reallocation.
        self.canvas_length = canvas_length
        layer = DifferentiableLayerCache if differentiable else LayerCache
        self.layers = [layer(s.is_sliding, config.sliding_window) for s in config.attention_shapes]

    def get_seq_length(self) -> int:
        return self.layers[0].length

    @property
    def batch_size(self) -> int | None:
        keys = self.layers[0].keys
        return None if keys is None else keys.shape[0]


def _padding(attention_mask: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    return None if attention_mask is None else attention_mask[:, None, None, start:end]


def encoder_mask(
    config: DiffusionGemmaTextConfig,
    is_sliding: bool,
    query_start: int,
    query_count: int,
    key_start: int,
    key_end: int,
    attention_mask: torch.Tensor | None,
    block_ids: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Boolean mask [B or 1, 1, queries, keys] for new tokens attending to cached + new keys.

    `attention_mask` is the 2D padding mask over all tokens (cached and new); `block_ids` marks, per new
    token, which image it belongs to (-1 for text) so that one image's tokens see each other.
    """
    q = torch.arange(query_start, query_start + query_count, device=device)[:, None]
    k = torch.arange(key_start, key_end, device=device)[None, :]
    window = config.sliding_window
    if config.is_causal:
        allowed = k <= q
        if is_sliding:
            allowed = allowed & (k > q - window)
    else:
        allowed = (q - k).abs() <= window if is_sliding else torch.ones_like(k <= q)
    allowed = allowed[None, None]
    if block_ids is not None:
        # Keys before this chunk belong to no block of it: give them -1.
        key_blocks = torch.full((block_ids.shape[0], key_end - key_start), -1, dtype=block_ids.dtype, device=device)
        key_blocks[:, query_start - key_start:] = block_ids
        same_block = (block_ids[:, :, None] == key_blocks[:, None, :]) & (block_ids[:, :, None] >= 0)
        allowed = allowed | same_block[:, None]
    padding = _padding(attention_mask, key_start, key_end)
    if padding is not None:
        allowed = allowed & padding
    return allowed


# Per padding mask, by its version (bumped by every in-place change): the first key from which on no row
# holds padding. Finding it reads a value from the device, which a pass captured in a CUDA graph must not
# do, so `generate` asks before a canvas's first pass; the canvas's denoising steps then ask the same of
# the same mask. Only integers are kept, so an entry goes with its mask.
_UNPADDED_FROM: WeakIdKeyDictionary = WeakIdKeyDictionary()


def unpadded_from(attention_mask: torch.Tensor) -> int:
    """The first key index of the 2-D padding mask from which on no row holds padding (0 without any)."""
    known = _UNPADDED_FROM.get(attention_mask)
    if known is None or known[0] != attention_mask._version:
        padded = (attention_mask == 0).any(dim=0)
        keys = torch.arange(padded.shape[0], device=padded.device)
        known = (attention_mask._version, int(torch.where(padded, keys, -1).max()) + 1)
        _UNPADDED_FROM[attention_mask] = known
    return known[1]


def decoder_mask(attention_mask: torch.Tensor | None, key_start: int, key_end: int) -> torch.Tensor | None:
    """The canvas sees every visible key that is not padding. Its keys run to the mask's end, so a span that
    starts after the last padding needs no mask (as in the reference, which masks only spans with padding)."""
    if attention_mask is None or key_start >= unpadded_from(attention_mask):
        return None
    return _padding(attention_mask, key_start, key_end)
