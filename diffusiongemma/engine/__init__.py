"""Denoising: the sampler, the per-request canvas state, one denoising step over a batch of requests, the
model runners that execute passes, and `generate`, which drives them."""
