"""The vision tower and embedder against the reference Gemma 4 vision model (transformers, test-only)."""

import pytest
import torch
from PIL import Image
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig
from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionModel

from diffusiongemma.hf.image_processing import ImageProcessor
from diffusiongemma.model.vision import (
    VisionConfig,
    VisionEmbedder,
    VisionTower,
    embed_images,
)

TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, patch_size=4, pooling_kernel_size=3, position_embedding_size=16,
)
TOWER_PREFIX = "model.encoder.vision_tower."
EMBEDDER_PREFIX = "model.encoder.embed_vision."


def randomise(module: torch.nn.Module, seed: int) -> None:
    """The reference starts with unit norms, a table of ones and infinite clip bounds, under which a wrong
    formula can still match; give every tensor a value that makes its role visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            leaf = name.rsplit(".", 1)[-1]
            noise = torch.randn(tensor.shape, generator=gen)
            if leaf in ("input_min", "output_min"):
                tensor.copy_(-0.5 - torch.rand((), generator=gen))
            elif leaf in ("input_max", "output_max"):
                tensor.copy_(0.5 + torch.rand((), generator=gen))
            elif "norm" in name:
                tensor.copy_(1 + 0.1 * noise)
            elif leaf == "std_scale":
                tensor.copy_(1 + 0.5 * noise)
            elif tensor.dim() == 2:
                tensor.copy_(noise / tensor.shape[1] ** 0.5)
            elif tensor.is_floating_point() and "inv_freq" not in name:
                tensor.copy_(noise)


def reference_tower(seed=0, attn="sdpa", **overrides):
    config = Gemma4VisionConfig(**{**TINY, **overrides})
    config._attn_implementation = attn
    model = Gemma4VisionModel(config).eval()
    randomise(model, seed)
    return model


def our_tower(reference: Gemma4VisionModel) -> VisionTower:
    tower = VisionTower(VisionConfig.from_dict(reference.config.to_dict())).eval()
    tower.load_state_dict(reference.state_dict())
    return tower.to(reference.dtype)


def patch_batch(grids, max_patches, patch_size=4, seed=0):
    """Random pixels for images of the given (columns, rows) patch grids, padded like the processor pads."""
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.zeros(len(grids), max_patches, 3 * patch_size**2)
    positions = torch.full((len(grids), max_patches, 2), -1, dtype=torch.long)
    for i, (cols, rows) in enumerate(grids):
        n = cols * rows
        pixel_values[i, :n] = torch.rand(n, 3 * patch_size**2, generator=gen)
        index = torch.arange(n)
        positions[i, :n] = torch.stack([index % cols, index // cols], dim=-1)
    return pixel_values, positions


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


# A wide, a tall and a square image in one batch: every row has padding patches.
GRIDS = [(9, 6), (3, 12), (6, 6)]


@pytest.mark.parametrize("clipped", [False, True])
@pytest.mark.parametrize("standardize", [False, True])
def test_tower_matches_reference(clipped, standardize):
    reference = reference_tower(use_clipped_linears=clipped, standardize=standardize)
    tower = our_tower(reference)
    pixel_values, positions = patch_batch(GRIDS, max_patches=45 + 18)
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values, pixel_position_ids=positions).last_hidden_state
        actual = tower(pixel_values, positions)
    assert actual.shape == expected.shape == (6 + 4 + 4, TINY["hidden_size"])
    assert relative_error(actual, expected) < 1e-5


def test_clip_bounds_take_effect():
    reference = reference_tower(use_clipped_linears=True)
    tower = our_tower(reference)
    pixel_values, positions = patch_batch(GRIDS, max_patches=63)
    with torch.no_grad():
        clipped = tower(pixel_values, positions)
        for name, buffer in tower.named_buffers():
            buffer.fill_(float("inf") if name.endswith("max") else -float("inf"))
        unclipped = tower(pixel_values, positions)
    assert relative_error(unclipped, clipped) > 1e-2


def test_tower_matches_eager_reference_without_padding():
    reference = reference_tower(attn="eager", num_key_value_heads=4, standardize=True)
    tower = our_tower(reference)
    pixel_values, positions = patch_batch([(9, 6), (6, 9)], max_patches=54)
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values, pixel_position_ids=positions).last_hidden_state
        actual = tower(pixel_values, positions)
    assert relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tower_in_half_precision_is_bitwise_the_reference(dtype):
    reference = reference_tower(standardize=True, use_clipped_linears=True).to(dtype)
    # `.to(dtype)` also rounds the reference's RoPE frequencies; from_pretrained(dtype=...) keeps them in
    # float32, and so do we.
    rotary = reference.encoder.rotary_emb
    rotary.inv_freq = rotary.compute_axial_rope_parameters(reference.config)[0]
    tower = our_tower(reference)
    pixel_values, positions = patch_batch(GRIDS, max_patches=63)
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values, pixel_position_ids=positions).last_hidden_state
        actual = tower(pixel_values, positions)
    assert actual.dtype == dtype
    assert torch.equal(actual, expected)


def test_state_dict_keys_equal_reference():
    for overrides in ({}, {"use_clipped_linears": True, "standardize": True}):
        reference = reference_tower(**overrides)
        ours = VisionTower(VisionConfig.from_dict(reference.config.to_dict())).state_dict()
        expected = reference.state_dict()
        assert list(ours) == list(expected)
        assert all(ours[k].shape == expected[k].shape for k in ours)


@pytest.fixture(scope="module")
def diffusion_model():
    text = dict(
        vocab_size=64, hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, global_head_dim=8, num_experts=2, top_k_experts=1,
        moe_intermediate_size=8, sliding_window=8, layer_types=["full_attention"],
    )
    vision = dict(model_type="gemma4_vision", **TINY, use_clipped_linears=True, standardize=True)
    vision["position_embedding_size"] = 64
    model = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(text_config=text, vision_config=vision)).eval()
    randomise(model.model.encoder.vision_tower, seed=1)
    randomise(model.model.encoder.embed_vision, seed=2)
    return model


def load_vision_from_checkpoint(model):
    state = model.state_dict()
    config = VisionConfig.from_dict(model.config.vision_config.to_dict())
    tower, embedder = VisionTower(config).eval(), VisionEmbedder(config, model.config.text_config.hidden_size)
    tower.load_state_dict({k[len(TOWER_PREFIX):]: v for k, v in state.items() if k.startswith(TOWER_PREFIX)})
    embedder.load_state_dict({k[len(EMBEDDER_PREFIX):]: v for k, v in state.items() if k.startswith(EMBEDDER_PREFIX)})
    return tower, embedder


def test_checkpoint_prefixes_load_strictly(diffusion_model):
    tower, embedder = load_vision_from_checkpoint(diffusion_model)
    assert list(embedder.state_dict()) == ["embedding_projection.weight"]


def test_image_features_match_reference_end_to_end(diffusion_model):
    """Two real images of different aspect ratios through our processor (patch 4, so the test is small),
    then the reference encoder's get_image_features against embed_images."""
    tower, embedder = load_vision_from_checkpoint(diffusion_model)
    gen = torch.Generator().manual_seed(3)
    images = [
        Image.fromarray(torch.randint(0, 256, size, generator=gen, dtype=torch.uint8).numpy())
        for size in ((40, 100, 3), (90, 30, 3))
    ]
    batch = ImageProcessor(patch_size=4, max_soft_tokens=70)(images)
    assert (batch["image_position_ids"][..., 0] == -1).any(dim=1).all(), "both images should carry padding"
    with torch.no_grad():
        expected = diffusion_model.model.encoder.get_image_features(
            batch["pixel_values"], batch["image_position_ids"]
        ).pooler_output
        actual = embed_images(tower, embedder, batch["pixel_values"], batch["image_position_ids"])
    assert actual.shape == (sum(batch["num_soft_tokens_per_image"]), 24)
    assert relative_error(actual, expected) < 1e-5


def test_embedder_norm_is_scale_free_rms():
    config = VisionConfig(**TINY)
    embedder = VisionEmbedder(config, 8)
    x = torch.randn(5, 32, dtype=torch.float64) * 7
    expected = embedder.embedding_projection(
        (x.float() * (x.float().pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) ** -0.5).double().float()
    )
    assert torch.allclose(embedder(x.float()), expected, atol=1e-6)


def test_bad_inputs_raise_value_error():
    tower = VisionTower(VisionConfig(**TINY))
    pixel_values, positions = patch_batch(GRIDS, max_patches=63)
    cases = [
        ((pixel_values[..., :-1], positions), "pixel_values must be"),
        ((pixel_values, positions.float()), "image_position_ids must be an integer"),
        ((pixel_values, positions[:, :-1]), "image_position_ids must be"),
        ((pixel_values[:, :-1], positions[:, :-1]), "multiple of pooling_kernel_size"),
        ((pixel_values, positions.clamp(max=0) + 16), r"\[0, 16\)"),
        ((pixel_values, positions.clamp(min=-2) - 1), "or \\(-1, -1\\) for padding"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            tower(*args)
    with pytest.raises(ValueError, match="text_hidden_size"):
        VisionEmbedder(VisionConfig(**TINY), 0)


def test_config_defaults_match_reference():
    expected = Gemma4VisionConfig().to_diff_dict()
    ours = VisionConfig().to_dict()
    for key, value in ours.items():
        assert expected[key] == value, key


def test_config_round_trips_and_keeps_unknown_keys():
    released = {
        "model_type": "gemma4_vision", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 72, "patch_size": 16,
        "pooling_kernel_size": 3, "position_embedding_size": 10240, "default_output_length": 280,
        "standardize": True, "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}, "dtype": "bfloat16",
    }
    config = VisionConfig.from_dict(released)
    assert (config.hidden_size, config.head_dim, config.rope_theta, config.standardize) == (1152, 72, 100.0, True)
    assert config.extra == {"default_output_length": 280, "dtype": "bfloat16"}
    assert VisionConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["rope_parameters"] == {"rope_type": "axial", "rope_theta": 100.0}
    reference_dict = Gemma4VisionConfig(**TINY).to_dict()
    assert VisionConfig.from_dict(reference_dict).to_dict() == reference_dict
    assert VisionConfig.from_dict({"rope_theta": 7.0}).rope_theta == 7.0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"num_hidden_layers": 2.5}, "num_hidden_layers must be a positive integer"),
        ({"num_attention_heads": 3, "num_key_value_heads": 2}, "multiple of num_key_value_heads"),
        ({"head_dim": 18}, "multiple of 4"),
        ({"hidden_activation": "tanh"}, "hidden_activation must be one of"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps must be a positive number"),
        ({"standardize": "yes"}, "standardize must be true or false"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 100.0}}, "rope_type must be 'axial'"),
        ({"rope_parameters": {"rope_type": "axial", "factor": 2.0}}, "does not take"),
        ({"rope_parameters": {"rope_theta": 0}}, "rope_theta must be a positive number"),
        ({"model_type": "siglip_vision_model"}, "model_type must be 'gemma4_vision'"),
    ],
)
def test_config_rejects_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        VisionConfig.from_dict({**TINY, **change})


def test_config_rejects_non_dict():
    with pytest.raises(ValueError, match="vision_config must be a dict"):
        VisionConfig.from_dict([("hidden_size", 32)])
