"""The sampler's vocabulary-sized work of one denoising step as one Triton kernel, for CUDA.

Unfused, the step after the LM head reads or writes a float32 tensor of the logits' size about forty
times: soft-capping (a cast, a division, tanh, a product), the temperature, the softmax, multinomial's
checks, variates and ratios, the argmax, the entropy's logsumexp and second softmax, and the cast of the
next step's self-conditioning input. At the released vocabulary (262144) one such tensor is 268 MB per
batch row, so that is about 10 GB per step at batch 1 and 85 GB at batch 8: more than all the weights. The
kernel reads the LM head's scores (in the model's dtype) twice and the variates once, and writes the
self-conditioning input once, in the model's dtype (the variates are written once before, as torch writes
them).

What it computes is what `generate`'s unfused step computes, formula by formula: the logits
tanh(scores / cap) * cap, processed logits y = logits / t, the argmax of y, the entropy of softmax(y) from
log-probabilities clamped like a categorical distribution's, and a token per position. "multinomial" takes
the argmax of p / q over exponential variates q that `torch.empty(...).exponential_` draws over the same
float32 shape, as `torch.multinomial` draws them: the same variates and the generator's state after them.
"inverse_cdf" takes one uniform per position, as the unfused fast path does, and "argmax" the argmax of y.
The sums run in another order (a running maximum and sum over blocks of the vocabulary) and tanh is the
kernel's own, so logits, probabilities and entropies can differ from torch's in the last bits, and a token
or an acceptance can differ where two candidates are that close.
"""

from __future__ import annotations

import importlib.util

import torch

SAMPLINGS = {"multinomial": 0, "inverse_cdf": 1, "argmax": 2}
# Columns one program handles at a time: 16 float32 values per thread at 8 warps.
_BLOCK = 4096


def usable(device: torch.device) -> bool:
    """Whether the fused kernel runs on `device`: CUDA, with Triton installed (torch's CUDA builds bring it)."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def denoise(scores: torch.Tensor, cap: float | None, temperature: torch.Tensor | None, sampling: str,
            generator: torch.Generator | None,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sampled tokens, argmax tokens, entropies, processed logits in `dtype`) for the LM head's `scores`
    [..., vocab] (any float dtype), soft-capped at `cap` (None for none) as the model's logits are, then
    divided by the temperature, a float32 tensor of one element (None for none)."""
    vocab = scores.shape[-1]
    flat = scores.reshape(-1, vocab).contiguous()
    rows, device = flat.shape[0], flat.device
    if temperature is None:
        temperature = torch.ones((), dtype=torch.float32, device=device)
    # Drawn as the unfused step draws them, over its float32 probabilities: the same calls, shapes, dtype and
    # generator ("argmax" draws nothing, and the kernel reads neither then).
    variates = uniforms = temperature
    if sampling == "multinomial":
        variates = torch.empty(flat.shape, dtype=torch.float32, device=device).exponential_(generator=generator)
    elif sampling == "inverse_cdf":
        uniforms = torch.rand(rows, 1, dtype=torch.float32, device=device, generator=generator)
    processed = torch.empty(flat.shape, dtype=dtype, device=device)
    tokens = torch.empty(rows, dtype=torch.long, device=device)
    argmax = torch.empty(rows, dtype=torch.long, device=device)
    entropy = torch.empty(rows, dtype=torch.float32, device=device)
    # Imported on first use: a CPU run need not spend the time Triton takes to import.
    from .sampler_kernel import denoise_kernel

    denoise_kernel[(rows,)](flat, 0.0 if cap is None else cap, temperature, variates, uniforms, processed, tokens,
                            argmax, entropy, vocab, HAS_CAP=cap is not None, SAMPLING=SAMPLINGS[sampling],
                            BLOCK=_BLOCK, num_warps=8)
    shape = scores.shape[:-1]
    return tokens.view(shape), argmax.view(shape), entropy.view(shape), processed.view(scores.shape)
