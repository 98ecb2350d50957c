"""RoPE's shortcut gives the bits of the rotate-half formula it replaces (the reference's)."""

import pytest
import torch
from conftest import tiny_model

from diffusiongemma.model.layers import RotaryEmbedding, apply_rope


def rotate_half_formula(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
def test_rope_is_the_rotate_half_formula_bit_for_bit(layer_type):
    config = tiny_model(global_head_dim=32).config.text_config
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
