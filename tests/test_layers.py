"""The layer building blocks' shortcuts give the bits of the formulas they replace (the reference's)."""

import warnings

import pytest
import torch

from diffusiongemma.config import DiffusionGemmaTextConfig
from diffusiongemma.layers import RotaryEmbedding, apply_rope, rms_norm, rms_norm_formula


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [16, 64, 256, 2816])
@pytest.mark.parametrize("with_weight", [True, False])
def test_cpu_rms_norm_is_the_formula_bit_for_bit(dtype, dim, with_weight):
    generator = torch.Generator().manual_seed(dim)
    for scale in (1e-3, 1.0, 1e3):
        x = (torch.randn(2, 7, dim, generator=generator) * scale).to(dtype)
        weight = (1 + 0.2 * torch.randn(dim, generator=generator)).to(dtype) if with_weight else None
        expected = rms_norm_formula(x, weight, 1e-6)
        assert torch.equal(rms_norm(x, weight, 1e-6), expected)
        # A strided view (a head of a projection) takes the same path.
        assert torch.equal(rms_norm(x[:, ::2], weight, 1e-6), expected[:, ::2])
        if with_weight:  # a float32 weight under bfloat16 autocast
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                mixed = rms_norm(x, weight.float(), 1e-6)
            assert mixed.dtype == dtype and torch.equal(mixed, rms_norm_formula(x, weight.float(), 1e-6))


def rotate_half_formula(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
def test_rope_is_the_rotate_half_formula_bit_for_bit(layer_type):
    config = DiffusionGemmaTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        layer_types=["sliding_attention", "full_attention"], num_experts=2, top_k_experts=1,
        moe_intermediate_size=16)
    rotary = RotaryEmbedding(config)
    head_dim = 16 if layer_type == "sliding_attention" else 32
    inv_freq = getattr(rotary, f"{layer_type}_inv_freq")
    positions = torch.tensor([[0, 1, 5, 77, 4095]])
    cos, sin = rotary(positions, layer_type, torch.float32)
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    assert torch.equal(cos[:, :, 0], angles.cos())
    assert torch.equal(sin[:, :, 0].abs(), angles.sin().abs())
    x = torch.randn(1, 5, 3, head_dim, generator=torch.Generator().manual_seed(0))
    expected = rotate_half_formula(x, angles.cos()[:, :, None], angles.sin()[:, :, None])
    assert torch.equal(apply_rope(x, cos, sin), expected)
