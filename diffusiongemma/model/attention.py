"""The attention products a pass runs, per layer, once a cache has said which keys the queries see.

Each cache kind (`cache.py`) builds its layers' attention functions, `attend(q, k, v)`, from these:
storing the new keys and values is the cache's business, the masked product is this module's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_attention(visible_keys, make_mask, folded: bool = False):
    """Builds each layer's attention function. `visible_keys(layer_cache, k, v)` stores the new keys and
    values and returns what the queries may attend to, with the absolute index of its first token;
    `make_mask(is_sliding, start, end)` gives the mask over that span, built once per span and pass.
    `folded` computes it as `folded_attention` does."""
    masks = {}

    def for_layer(layer_cache):
        def attend(q, k, v):
            keys, values, start = visible_keys(layer_cache, k, v)
            span = (layer_cache.is_sliding, start, start + keys.shape[2])
            if span not in masks:
                masks[span] = make_mask(*span)
            if folded:
                return folded_attention(q, keys, values, masks[span])
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=masks[span], scale=1.0, enable_gqa=True)
        return attend

    return for_layer


def folded_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention with a mask, as multi-head attention over the key/value heads: the query
    heads that share a key/value head are folded into the query length. With a mask, SDPA's own grouped
    path falls back to its math kernel, which copies the keys and values once per query head; folded,
    nothing is copied but the queries, and the memory-efficient kernel can take the call. The sums follow
    other shapes, so the last bits are not `enable_gqa`'s."""
    batch, heads, length, dim = q.shape
    groups = heads // keys.shape[1]
    # Query head h reads key/value head h // groups, so consecutive query heads fold together.
    folded = q.reshape(batch, keys.shape[1], groups * length, dim)
    if mask.shape[-2] != 1:
        mask = mask.repeat(1, 1, groups, 1)
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=1.0)
    # Not `view`: the fused kernels hand back a transposed layout.
    return out.reshape(batch, heads, length, dim)


def attention_per_row(layer_caches: list):
    """One layer's attention when row r of the batch is one request's canvas over `layer_caches[r]`: one
    product per row, the very one that request gets alone. Padding the prefixes to one length would copy
    the caches on every step, and the masked keys would change the kernel's summation order."""
    def attend(q, k, v):
        rows = []
        for row, layer_cache in enumerate(layer_caches):
            keys, values, _ = layer_cache.with_canvas(k[row:row + 1], v[row:row + 1])
            rows.append(F.scaled_dot_product_attention(q[row:row + 1], keys, values, scale=1.0, enable_gqa=True))
        return torch.cat(rows)
    return attend
