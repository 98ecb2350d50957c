"""The encoder's key/value caches and the attention masks that follow from them.

`KVCache` keeps every committed token's keys and values per layer, with room after them for one canvas: the
decoder writes the canvas there for one pass without committing it. A sliding layer shows new tokens
exactly the `sliding_window - 1` tokens before them, as the reference's default cache does, so the eager path
gives the reference's bits. Masks are written in absolute token indices. `differentiable=True` gives the
training cache, built by concatenation so that autograd can go through it.

`StaticKVCache` keeps fixed buffers and shapes, puts the canvas in the same slots every time and builds its
masks on the device from device-side counts of committed tokens, one per row, so that one pass captured in a
CUDA graph serves every canvas (`engine/graphs.py`); its rows can also be many requests' own caches, each of
its own length (`StaticKVCache.rows`, the server's `SlotsRunner`). Its attention runs over masked slots in
another order, so its last bits differ from `KVCache`'s. Design notes: docs/graphs.md.
"""

from __future__ import annotations

import copy

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .attention import attention_per_row, masked_attention
from .config import AttentionShape, DiffusionGemmaTextConfig


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
        self.differentiable = differentiable
        layer = DifferentiableLayerCache if differentiable else LayerCache
        self.layers = [layer(s.is_sliding, config.sliding_window) for s in config.attention_shapes]

    def get_seq_length(self) -> int:
        return self.layers[0].length

    @property
    def batch_size(self) -> int | None:
        keys = self.layers[0].keys
        return None if keys is None else keys.shape[0]

    def encoder_attention(self, config: DiffusionGemmaTextConfig, count: int, attention_mask: torch.Tensor | None,
                          block_ids: torch.Tensor | None, device: torch.device) -> list:
        """Per layer, the attention of `count` new tokens, which it appends to the cache; `attention_mask` is
        the padding of every token, cached and new."""
        query_start = self.get_seq_length()
        attention = masked_attention(
            lambda layer_cache, k, v: layer_cache.append(k, v, self.canvas_length),
            lambda sliding, start, end: encoder_mask(config, sliding, query_start, count, start, end, attention_mask,
                                                     block_ids, device))
        return [attention(layer) for layer in self.layers]

    def decoder_attention(self, attention_mask: torch.Tensor | None) -> list:
        """Per layer, the canvas's attention to the prefix and itself; the cache keeps only the prefix."""
        attention = masked_attention(lambda layer_cache, k, v: layer_cache.with_canvas(k, v),
                                     lambda sliding, start, end: decoder_mask(attention_mask, start, end))
        return [attention(layer) for layer in self.layers]


class RequestCaches(list):
    """One `KVCache` of one row per request: row r of a decoder pass is request r's canvas over its own
    cache, and gets exactly the numbers it gets alone (no padding mask: each row has its own)."""

    def get_seq_length(self) -> int:
        return self[0].get_seq_length()

    def decoder_attention(self, attention_mask: torch.Tensor | None) -> list:
        return [attention_per_row([cache.layers[index] for cache in self]) for index in range(len(self[0].layers))]


def check_mask(name: str, mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"`{name}` must be a 2D tensor [batch, cached + new tokens]")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"`{name}` has shape {tuple(mask.shape)}, expected ({batch}, {length}): "
                         "one entry per cached and new token")
    return mask.bool()


def check_cache(cache, batch: int) -> None:
    if isinstance(cache, list):
        if len(cache) != batch or any(c.batch_size != 1 for c in cache):
            raise ValueError(f"a list in `past_key_values` needs one filled cache of batch 1 per row; got "
                             f"{len(cache)} caches for a batch of {batch}")
    elif cache is not None and cache.batch_size not in (None, batch):
        raise ValueError(f"`past_key_values` holds a batch of {cache.batch_size}, the inputs a batch of {batch}")


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
    queries = torch.arange(query_start, query_start + query_count, device=device)
    allowed = _encoder_allowed(config, is_sliding, queries, torch.arange(key_start, key_end, device=device),
                               block_ids)
    padding = _padding(attention_mask, key_start, key_end)
    return allowed if padding is None else allowed & padding


def _encoder_allowed(config: DiffusionGemmaTextConfig, is_sliding: bool, queries: torch.Tensor, keys: torch.Tensor,
                     block_ids: torch.Tensor | None) -> torch.Tensor:
    """[B or 1, 1, queries, keys]: which keys each new token may see, by absolute token indices (`queries` are
    the new tokens', consecutive; `keys` may come in any order)."""
    q, k = queries[:, None], keys[None, :]
    window = config.sliding_window
    if config.is_causal:
        allowed = k <= q
        if is_sliding:
            allowed = allowed & (k > q - window)
    else:
        allowed = (q - k).abs() <= window if is_sliding else torch.ones_like(k <= q)
    allowed = allowed[None, None]
    if block_ids is not None:
        # Keys before the new tokens belong to no block of theirs: give them -1.
        offset = keys - queries[0]
        new = (offset >= 0) & (offset < queries.shape[0])
        key_blocks = torch.where(new, block_ids[:, offset.clamp(0, queries.shape[0] - 1)], -1)
        same_block = (block_ids[:, :, None] == key_blocks[:, None, :]) & (block_ids[:, :, None] >= 0)
        allowed = allowed | same_block[:, None]
    return allowed


# Per padding mask, by its version (bumped by every in-place change): the first key from which on no row
# holds padding. Finding it reads a value from the device, a wait for the work queued there; every layer
# of every denoising step of a canvas asks the same of the same mask, so it is read once. Only integers are
# kept, so an entry goes with its mask.
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


class StaticLayerCache:
    """One layer's fixed slots in a `StaticKVCache`: a full layer keeps every committed token in the slot of
    its absolute index, a sliding layer the last `window - 1`, oldest first and ending at slot `window - 2`;
    the canvas's slots follow."""

    def __init__(self, shape: AttentionShape, sliding_window: int, capacity: int, canvas_length: int, batch: int,
                 dtype: torch.dtype, device: torch.device):
        self.is_sliding = shape.is_sliding
        self.keep = sliding_window - 1
        self.committed_slots = self.keep if self.is_sliding else capacity
        size = (batch, shape.num_key_value_heads, self.committed_slots + canvas_length, shape.head_dim)
        # Zeros, not garbage: a masked key's weight is exactly zero, and zero times a NaN is not.
        self.keys = torch.zeros(size, dtype=dtype, device=device)
        self.values = torch.zeros(size, dtype=dtype, device=device)

    def committed_span(self, length: int) -> tuple[int, int]:
        """(first slot, count) of the committed tokens this layer holds when `length` tokens are committed."""
        count = min(length, self.keep) if self.is_sliding else length
        return (self.keep - count if self.is_sliding else 0), count

    def rows(self, first: int, last: int) -> StaticLayerCache:
        view = copy.copy(self)
        view.keys, view.values = self.keys[first:last], self.values[first:last]
        return view

    def append(self, keys: torch.Tensor, values: torch.Tensor, used: torch.Tensor):
        """Writes new committed tokens (the encoder) after the `used` ones (a 0-d count, the same in every
        row); returns the keys and values they attend over, in the order of `StaticKVCache.encoder_mask`, and
        0 for where their span starts (these masks do not need it)."""
        if not self.is_sliding:
            slots = used + torch.arange(keys.shape[2], device=keys.device)
            self.keys[:, :, :self.committed_slots].index_copy_(2, slots, keys)
            self.values[:, :, :self.committed_slots].index_copy_(2, slots, values)
            return self.keys[:, :, :self.committed_slots], self.values[:, :, :self.committed_slots], 0
        visible_keys = torch.cat([self.keys[:, :, :self.keep], keys], dim=2)
        visible_values = torch.cat([self.values[:, :, :self.keep], values], dim=2)
        self.keys[:, :, :self.keep] = visible_keys[:, :, -self.keep:]
        self.values[:, :, :self.keep] = visible_values[:, :, -self.keep:]
        return visible_keys, visible_values, 0

    def with_canvas(self, keys: torch.Tensor, values: torch.Tensor):
        """The canvas's keys and values in its own slots, for one decoder pass: every slot is returned, with 0
        as in `append`."""
        self.keys[:, :, self.committed_slots:] = keys
        self.values[:, :, self.committed_slots:] = values
        return self.keys, self.values, 0


class StaticKVCache:
    """A cache whose buffers, shapes and masks stay the same from one canvas (and one `generate`) to the next,
    so that a pass captured in a CUDA graph once can be replayed over it (see `graphs.py`).

    Passes attend over every slot of a layer, with masks built on the device from each row's count of
    committed tokens (`used`, a device tensor [batch]) and the padding of each absolute position
    (`key_valid`); masked slots hold zeros or stale tokens. The keys come in another order than `KVCache`'s
    and with masked ones among them, so the attention's sums, and with them the last bits, are its own.
    Decoder passes take rows of any counts; an encoder pass writes the same number of tokens after the same
    count in every row (a `generate` batch, or one row's view). Passes do not move the counts: `advance`
    does, after an encoder pass, outside any capture; `length` is the host's copy of the count where all
    rows share it.
    """

    def __init__(self, config: DiffusionGemmaTextConfig, batch: int, capacity: int, canvas_length: int,
                 dtype: torch.dtype, device: torch.device):
        self.config = config
        self.batch_size = batch
        self.capacity = capacity
        self.canvas_length = canvas_length
        self.length = 0
        self.used = torch.zeros(batch, dtype=torch.long, device=device)
        self.key_valid = torch.ones(batch, capacity, dtype=torch.bool, device=device)
        self.layers = [StaticLayerCache(s, config.sliding_window, capacity, canvas_length, batch, dtype, device)
                       for s in config.attention_shapes]

    def get_seq_length(self) -> int:
        return self.length

    def rows(self, first: int, last: int) -> StaticKVCache:
        """Rows [first, last) as a cache of their own over the same memory: what passes over the view write,
        and what its `advance` counts, this cache holds. Its `length` is the caller's to set."""
        view = copy.copy(self)
        view.batch_size = last - first
        view.used, view.key_valid = self.used[first:last], self.key_valid[first:last]
        view.layers = [layer.rows(first, last) for layer in self.layers]
        return view

    def encoder_attention(self, config: DiffusionGemmaTextConfig, count: int, attention_mask: torch.Tensor | None,
                          block_ids: torch.Tensor | None, device: torch.device) -> list:
        """Per layer, the attention of `count` new tokens written after the committed ones (counted once the
        owner calls `advance`); the padding is the cache's own (`start`)."""
        attention = masked_attention(lambda layer_cache, k, v: layer_cache.append(k, v, self.used[0]),
                                     lambda sliding, start, end: self.encoder_mask(sliding, count, block_ids),
                                     folded=True)
        return [attention(layer) for layer in self.layers]

    def decoder_attention(self, attention_mask: torch.Tensor | None) -> list:
        attention = masked_attention(lambda layer_cache, k, v: layer_cache.with_canvas(k, v),
                                     lambda sliding, start, end: self.decoder_mask(sliding), folded=True)
        return [attention(layer) for layer in self.layers]

    def start(self, attention_mask: torch.Tensor, past: KVCache | None = None) -> None:
        """Empties the cache, or fills it with `past`'s committed tokens; `attention_mask` is the padding of
        every token so far, the prompt's included."""
        self.length = 0 if past is None else past.get_seq_length()
        self.used.fill_(self.length)
        self.key_valid.fill_(True)
        self.key_valid[:, :attention_mask.shape[1]] = attention_mask
        for layer, source in zip(self.layers, past.layers if self.length else ()):
            start, count = layer.committed_span(self.length)
            layer.keys[:, :, start:start + count] = source.keys[:, :, source.used - count:source.used]
            layer.values[:, :, start:start + count] = source.values[:, :, source.used - count:source.used]

    def advance(self, count: int) -> None:
        """Counts the tokens the last encoder pass wrote as committed."""
        self.length += count
        self.used.add_(count)

    def positions(self, count: int) -> torch.Tensor:
        """[batch, count]: the positions of `count` tokens after each row's committed ones, computed on the
        device."""
        return self.used[:, None] + torch.arange(count, device=self.used.device)

    def to_dynamic(self, into: KVCache | None = None) -> KVCache:
        """A copy of the committed tokens, to hand to a caller (this cache's slots are overwritten by the next
        `generate`): in `into`, whose tokens it replaces, or in a new `KVCache`."""
        dynamic = into if into is not None else KVCache(self.config, self.canvas_length)
        for layer, target in zip(self.layers, dynamic.layers):
            start, count = layer.committed_span(self.length)
            target.keys = layer.keys[:, :, start:start + count].clone()
            target.values = layer.values[:, :, start:start + count].clone()
            target.start, target.used = self.length - count, count
        return dynamic

    def _committed_positions(self, is_sliding: bool, used: torch.Tensor) -> torch.Tensor:
        """[rows or 1, slots]: the absolute position of the token each committed slot of a layer of this kind
        holds, for rows that committed `used` [rows] tokens."""
        if not is_sliding:
            return torch.arange(self.capacity, device=used.device)[None]
        keep = self.config.sliding_window - 1
        return used[:, None] - keep + torch.arange(keep, device=used.device)

    def _known(self, positions: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """[B, keys]: which of these absolute positions ([B or 1, keys]) hold a token before `end` [B] that is
        not padding."""
        inside = (positions >= 0) & (positions < end[:, None])
        slots = positions.clamp(0, self.capacity - 1).expand(self.batch_size, -1)
        return inside & self.key_valid.gather(1, slots)

    def decoder_mask(self, is_sliding: bool) -> torch.Tensor:
        """[B, 1, 1, slots]: each row's canvas sees every committed token of its row and itself."""
        known = self._known(self._committed_positions(is_sliding, self.used), self.used)
        canvas = known.new_ones(self.batch_size, self.canvas_length)
        return torch.cat([known, canvas], dim=1)[:, None, None]

    def encoder_mask(self, is_sliding: bool, count: int, block_ids: torch.Tensor | None) -> torch.Tensor:
        """[B, 1, count, keys]: `count` new tokens over what `StaticLayerCache.append` returns."""
        queries = self.positions(count)[0]
        keys = self._committed_positions(is_sliding, self.used[:1])[0]
        if is_sliding:
            keys = torch.cat([keys, queries])
        allowed = _encoder_allowed(self.config, is_sliding, queries, keys, block_ids)
        return allowed & self._known(keys[None], self.used + count)[:, None, None]
