"""Fused CUDA kernels (Triton, in `triton_kernels.py`) and the one policy that says where they run.

`denoise`: the sampler's vocabulary-sized work of a denoising step in one kernel (soft-capping, temperature,
sampling, argmax, entropy, the next self-conditioning input); `softmax`: the self-conditioning input's
softmax; `rms_norm`: `layers.rms_norm`; `grouped_linear`: the experts' grouped products.

`usable(device)`: the kernels run on CUDA with Triton installed, never on the CPU, where the engine keeps the
reference's bits. `takes(x, ...)`: the three kernels inside the model's pass run, in addition, only where
autograd records nothing; training runs torch's operations. Each kernel computes the reference's formula
with its sums in its own order, so on CUDA its last bits can differ from torch's; the random numbers
`denoise` takes are torch's. Design notes: docs/kernels.md.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch

# The kernel's code for each sampling (`sampler.SAMPLING`).
SAMPLINGS = {"multinomial": 0, "inverse_cdf": 1, "argmax": 2}
# Columns one program handles at a time: 16 float32 values per thread at 8 warps.
_BLOCK = 4096
# The experts' products: rows per block (at batch 1 an expert gets some 33) and output columns per program.
# Fixed, not chosen per call, so that the kernel compiles once, in the eager pass before the first capture,
# and never inside a capture.
_ROWS, _COLUMNS = 64, 64


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreted() -> bool:
    # Triton's interpreter (the tests) multiplies bfloat16 tiles wrongly: its products then run in float32,
    # which gives what a GPU's bfloat16 products accumulated in float32 give, to rounding.
    return os.environ.get("TRITON_INTERPRET") == "1"


def usable(device: torch.device) -> bool:
    """Whether the fused kernels run on `device`: CUDA, with Triton installed (torch's CUDA builds bring it)."""
    return device.type == "cuda" and _triton_installed()


def takes(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether an operation on x (and `others`, None for absent) runs as a fused kernel: on a device where the
    kernels run, where autograd records nothing (training runs torch's operations, which it differentiates).
    The device comes first: on the CPU that is the whole answer."""
    return usable(x.device) and not (torch.is_grad_enabled()
                                     and any(t is not None and t.requires_grad for t in (x, *others)))


def denoise(scores: torch.Tensor, cap: float | None, temperature: torch.Tensor | None, sampling: str,
            draws: torch.Generator | None | list[tuple[torch.Generator | None, int]], into: torch.Tensor,
            kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sampled tokens, argmax tokens, entropies) for the LM head's `scores` [..., vocab] (any float dtype),
    soft-capped at `cap` (None for none) as the model's logits are, then divided by the temperature: a
    float32 tensor of one element, or of one per row of positions (`scores.shape[0]`), or None for none.
    `sampling`: "multinomial" (the argmax of p / q over exponential variates drawn as `torch.multinomial`
    draws them), "inverse_cdf" (one uniform per position) or "argmax" (nothing drawn).
    `draws`: the generator of every position (None: torch's own), or (generator, positions) pairs in order,
    whose lengths add up to all positions: each span's random numbers come from its own generator, as if
    drawn alone. The processed logits go into `into` (the
    scores' shape, the self-conditioning input's dtype), except at the positions where `kept` (a bool
    tensor broadcast to the scores' positions) is true: those keep what `into` holds."""
    vocab = scores.shape[-1]
    flat = scores.reshape(-1, vocab).contiguous()
    rows, device = flat.shape[0], flat.device
    if not isinstance(draws, list):
        draws = [(draws, rows)]
    if temperature is None:
        temperature = torch.ones((), dtype=torch.float32, device=device)
    # Positions per temperature: all of them share a 0-d one.
    per_temperature = rows if temperature.dim() == 0 else rows // temperature.numel()
    # Drawn as the unfused step draws them, over its float32 probabilities: the same calls, shapes, dtype and
    # generator ("argmax" draws nothing, and the kernel reads neither then).
    variates = uniforms = temperature
    if sampling == "multinomial":
        variates = torch.empty(flat.shape, dtype=torch.float32, device=device)
        for (generator, count), start in zip(draws, _starts(draws)):
            variates[start:start + count].exponential_(generator=generator)
    elif sampling == "inverse_cdf":
        uniforms = torch.cat([torch.rand(count, 1, dtype=torch.float32, device=device, generator=generator)
                              for generator, count in draws])
    if kept is not None:
        kept = kept.expand(scores.shape[:-1]).reshape(-1).to(torch.int8)
    tokens = torch.empty(rows, dtype=torch.long, device=device)
    argmax = torch.empty(rows, dtype=torch.long, device=device)
    entropy = torch.empty(rows, dtype=torch.float32, device=device)
    # Imported on first use: a CPU run need not spend the time Triton takes to import.
    from .triton_kernels import denoise_kernel

    denoise_kernel[(rows,)](flat, 0.0 if cap is None else cap, temperature, per_temperature, variates, uniforms,
                            into, tokens if kept is None else kept, tokens, argmax, entropy, vocab,
                            HAS_CAP=cap is not None, HAS_KEPT=kept is not None, SAMPLING=SAMPLINGS[sampling],
                            BLOCK=_BLOCK, num_warps=8)
    shape = scores.shape[:-1]
    return tokens.view(shape), argmax.view(shape), entropy.view(shape)


def _starts(draws: list[tuple[torch.Generator | None, int]]) -> list[int]:
    starts, start = [], 0
    for _, count in draws:
        starts.append(start)
        start += count
    return starts


def softmax(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """softmax(x, dim=-1) computed in float32 and returned in `dtype`, in one kernel."""
    from .triton_kernels import softmax_kernel

    width = x.shape[-1]
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    softmax_kernel[(x.numel() // width,)](x, out, width, BLOCK=_BLOCK, num_warps=8)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`layers.rms_norm` in one kernel, computed in float32 and returned in x's dtype."""
    import triton

    from .triton_kernels import rms_norm_kernel

    width = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    block = triton.next_power_of_2(width)
    # Narrow rows (the heads' norms) share a program, so that each program has a few thousand values.
    per_program = max(min(4096 // block, 16), 1)
    rows = x.numel() // width
    rms_norm_kernel[(triton.cdiv(rows, per_program),)](
        x, x if weight is None else weight, out, rows, width, eps, HAS_WEIGHT=weight is not None,
        ROWS=per_program, BLOCK=block, num_warps=min(max(block * per_program // 512, 1), 8))
    return out


def reads_codes(codes: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether `grouped_linear` reads these quantized weights' codes itself (`kernels.quantized`'s storage):
    int8 or e4m3 codes [E, out, in] with a scale per output channel [E, out, 1], or int4 pairs [E, out, in / 2]
    with groups of a multiple of 16 inputs. Other scales (an fp8 checkpoint's per tensor or per block) are
    dequantized first."""
    if codes.dtype == torch.uint8:
        return scale.dim() == codes.dim() and (2 * codes.shape[-1] // scale.shape[-1]) % 16 == 0
    return scale.shape == (*codes.shape[:-1], 1)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
    """The experts' grouped products in one kernel: rows of x [rows, in] sorted by expert, `ends` [E]
    (int32) where each expert's rows end, times their expert's weight [E, out, in] transposed. With `scale`,
    `weight` holds quantized codes that `reads_codes` accepts, and the products are code times scale."""
    import triton

    from .triton_kernels import grouped_linear_kernel

    rows, inner = x.shape
    experts, width, _ = weight.shape
    x, weight = x.contiguous(), weight.contiguous()
    codes, groups, block_k = 0, 1, 64
    if scale is not None:
        scale = scale.contiguous()
        codes = 2 if weight.dtype == torch.uint8 else 1
        if codes == 2:
            groups = scale.shape[-1]
            # A block of inputs must lie in one group, whose scale multiplies its sum.
            block_k = math.gcd(64, inner // groups)
    out = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    # Any routing makes at most this many blocks of rows; the programs past the last one return at once.
    blocks = triton.cdiv(rows, _ROWS) + experts
    grouped_linear_kernel[(blocks * triton.cdiv(width, _COLUMNS),)](
        x, weight, weight if scale is None else scale, out, ends, experts, width, inner,
        EXPERTS=triton.next_power_of_2(experts), BLOCK_M=_ROWS, BLOCK_N=_COLUMNS, BLOCK_K=block_k,
        IN_FLOAT32=x.dtype == torch.float32 or _interpreted(), CODES=codes, GROUPS=groups)
    return out
