"""The first call of each of oneMKL's vector-maths routines, made once per process on one thread."""

import torch

# torch hands contiguous float32 and float64 cos, sin, tanh, exp, log and sqrt on the CPU to oneMKL's vector
# maths (VML), one call per intra-op thread's chunk. The engine calls them in float32: the rotary tables
# (text and vision), the logit soft-cap, the sampler's logsumexp, AdamW's square roots; its other maths (pow,
# gelu, softmax, log_softmax, the exponential draws) does not reach VML, and no bfloat16 call does. float64
# is warmed too, for code run beside the engine (see docs/reference-differences.md): it costs a fraction of a millisecond.
ROUTINES = (torch.cos, torch.sin, torch.tanh, torch.exp, torch.log, torch.sqrt)


def warm_up_vector_maths() -> None:
    """Calls each routine once, in float32 and float64, on the calling thread, so that no later first call
    is one several intra-op threads make together."""
    # oneMKL 2024.2, bundled with torch's CPU wheels, resolves which kernel serves a VML call lazily, on the
    # first call: a thread that makes its first call while another thread is still resolving can run a
    # low-accuracy kernel over its whole chunk, once (pytorch/pytorch#188792). Sixteen values stay under
    # torch's 2,048-element grain and under MKL's own splitting, so every call runs here, alone, and no
    # thread count is touched.
    for dtype in (torch.float32, torch.float64):
        values = torch.full((16,), 0.5, dtype=dtype)
        for routine in ROUTINES:
            routine(values)
