"""The sampler's vocabulary-sized work of one denoising step as one Triton kernel, for CUDA.

Unfused, the step after the decoder reads or writes a float32 tensor of the logits' size about thirty
times: the temperature, the softmax, multinomial's checks, variates and ratios, the argmax, the entropy's
logsumexp and second softmax, and the cast of the next step's self-conditioning input. At the released
vocabulary (262144) one such tensor is 268 MB per batch row, so that is about 8 GB per step at batch 1 and
64 GB at batch 8: more than all the weights. The kernel reads the logits twice, the variates once,
and writes the self-conditioning input once, in the model's dtype (the variates are written once before,
as torch writes them).

What it computes is what `generate`'s unfused step computes, formula by formula: processed logits
y = logits / t, the argmax of y, the entropy of softmax(y) from log-probabilities clamped like a categorical
distribution's, and a token per position. "multinomial" takes the argmax of p / q over exponential variates
q that `torch.empty_like(...).exponential_` draws over the same shape, as `torch.multinomial` draws them:
the same variates and the generator's state after them. "inverse_cdf" takes one uniform per position, as the
unfused fast path does, and "argmax" the argmax of y. The sums run in another order (a running maximum and
sum over blocks of the vocabulary), so probabilities and entropies can differ from torch's in the last bits,
and a token or an acceptance can differ where two candidates are that close.
"""

from __future__ import annotations

import functools

import torch

SAMPLINGS = {"multinomial": 0, "inverse_cdf": 1, "argmax": 2}
# Columns one program handles at a time: 16 float32 values per thread at 8 warps.
_BLOCK = 4096


@functools.cache
def _triton():
    try:
        import triton
    except ImportError:
        return None
    return triton


def usable(device: torch.device) -> bool:
    """Whether the fused kernel runs on `device`: CUDA, with Triton installed (torch's CUDA builds bring it)."""
    return device.type == "cuda" and _triton() is not None


@functools.cache
def _kernel():
    """Built on first use: importing Triton costs time a CPU run need not spend, and the tests build it under
    Triton's interpreter (TRITON_INTERPRET=1), which runs it on CPU tensors."""
    triton = _triton()
    import triton.language as tl

    @triton.jit
    def denoise_kernel(logits, temperature, variates, uniforms, processed, tokens, argmax, entropy, vocab,
                       SAMPLING: tl.constexpr, BLOCK: tl.constexpr):
        # One program per position. Each lane keeps its own running values over the blocks of the row and
        # the lanes are combined once at the end: no reduction across threads inside the loops, except
        # inverse_cdf's running sum, which has to follow the vocabulary's order.
        row = tl.program_id(0).to(tl.int64)
        first = row * vocab
        t = tl.load(temperature)
        lanes = tl.arange(0, BLOCK)

        # Pass 1: the maximum of y = logits / t (and where it first occurs), and the sum of exp(y - maximum).
        # Lanes start from float32's lowest value rather than -inf, so that a lane past the vocabulary's end
        # adds exp(-inf) = 0 where starting from -inf would give exp(-inf - -inf), NaN.
        top = tl.full([BLOCK], -3.4028234663852886e38, tl.float32)
        top_index = tl.zeros([BLOCK], tl.int32)
        total = tl.zeros([BLOCK], tl.float32)
        for start in range(0, vocab, BLOCK):
            index = start + lanes
            inside = index < vocab
            y = tl.load(logits + first + index, mask=inside, other=float("-inf")) / t
            new_top = tl.maximum(top, y)
            total = total * tl.exp(top - new_top) + tl.exp(y - new_top)
            top_index = tl.where(y > top, index, top_index)
            top = new_top
        row_top = tl.max(top, axis=0)
        row_total = tl.sum(total * tl.exp(top - row_top), axis=0)
        row_top_index = tl.min(tl.where(top == row_top, top_index, vocab), axis=0)

        # Pass 2: probabilities, the entropy, the token, and y in the model's dtype for self-conditioning.
        log_total = row_top + tl.log(row_total)
        terms = tl.zeros([BLOCK], tl.float32)
        best = tl.full([BLOCK], -1.0, tl.float32)
        best_index = tl.zeros([BLOCK], tl.int32)
        token = tl.full([], vocab, tl.int32)
        running = tl.full([], 0.0, tl.float32)
        # Read for both samplings (multinomial's `uniforms` is any float32 tensor with a value per row), so
        # that the loop carries the same values either way.
        target = row_total * tl.load(uniforms + row)
        for start in range(0, vocab, BLOCK):
            index = start + lanes
            inside = index < vocab
            y = tl.load(logits + first + index, mask=inside, other=float("-inf")) / t
            tl.store(processed + first + index, y.to(processed.dtype.element_ty), mask=inside)
            weight = tl.exp(y - row_top)
            p = weight / row_total
            # Log-probabilities clamped at float32's lowest value too, as a categorical distribution clamps them.
            terms += tl.where(inside, tl.maximum(y - log_total, -3.4028234663852886e38) * p, 0.0)
            if SAMPLING == 0:
                q = tl.load(variates + first + index, mask=inside, other=1.0)
                ratio = tl.where(inside, p / q, -1.0)
                best_index = tl.where(ratio > best, index, best_index)
                best = tl.maximum(best, ratio)
            elif SAMPLING == 1:
                # The first position whose cumulative weight passes the target, as searchsorted(right=True).
                cumulative = running + tl.cumsum(weight, axis=0)
                token = tl.minimum(token, tl.min(tl.where(cumulative > target, index, vocab), axis=0))
                running = tl.max(cumulative, axis=0)
        if SAMPLING == 0:
            token = tl.min(tl.where(best == tl.max(best, axis=0), best_index, vocab), axis=0)
        elif SAMPLING == 2:
            token = row_top_index
        tl.store(tokens + row, tl.minimum(token, vocab - 1).to(tl.int64))
        tl.store(argmax + row, row_top_index.to(tl.int64))
        tl.store(entropy + row, -tl.sum(terms, axis=0))

    return denoise_kernel


def denoise(logits: torch.Tensor, temperature: torch.Tensor | None, sampling: str, generator: torch.Generator | None,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sampled tokens, argmax tokens, entropies, processed logits in `dtype`) for float32 `logits`
    [..., vocab], with the temperature as a float32 tensor of one element (None for none)."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab).contiguous()
    rows, device = flat.shape[0], flat.device
    if temperature is None:
        temperature = torch.ones((), device=device)
    # Drawn as the unfused step draws them: the same calls, shapes and generator ("argmax" draws nothing).
    variates, uniforms = flat, flat
    if sampling == "multinomial":
        variates = torch.empty_like(flat).exponential_(generator=generator)
    elif sampling == "inverse_cdf":
        uniforms = torch.rand(rows, 1, device=device, generator=generator)
    processed = torch.empty(flat.shape, dtype=dtype, device=device)
    tokens = torch.empty(rows, dtype=torch.long, device=device)
    argmax = torch.empty(rows, dtype=torch.long, device=device)
    entropy = torch.empty(rows, dtype=torch.float32, device=device)
    _kernel()[(rows,)](flat, temperature, variates, uniforms, processed, tokens, argmax, entropy, vocab,
                       SAMPLING=SAMPLINGS[sampling], BLOCK=_BLOCK, num_warps=8)
    shape = logits.shape[:-1]
    return tokens.view(shape), argmax.view(shape), entropy.view(shape), processed.view(logits.shape)
