"""Fused CUDA kernels (Triton) and the one policy that says where they run."""
