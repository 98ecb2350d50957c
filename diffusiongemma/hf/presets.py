"""Random-weight checkpoints in the released layout, for trying the engine and its tools offline.

A preset's model writes gibberish: it has the architecture of DiffusionGemma but was never trained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..engine.generate import DiffusionGemmaGenerationConfig
from ..model.config import FULL, SLIDING, DiffusionGemmaConfig, DiffusionGemmaTextConfig
from ..model.vision import VisionConfig
from .chat_fixture import write_tokenizer
from .image_processing import SUPPORTED_SOFT_TOKENS, ImageProcessor
from .modeling import DiffusionGemmaForBlockDiffusion

# The smallest budget keeps each image's prompt share, and the tower's work on it, small. At this budget an
# image is at most 3 * 70 = 210 patches long (a strip one pooling block high), so the presets' position tables
# of 256 rows cover every image.
SOFT_TOKENS_PER_IMAGE = min(SUPPORTED_SOFT_TOKENS)

PRESETS = {
    # Small enough for a test suite: a generate call takes a fraction of a second on one CPU core.
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, num_global_key_value_heads=1, head_dim=16, global_head_dim=32,
                  num_experts=8, top_k_experts=2, moe_intermediate_size=32, vocab_size=512, sliding_window=32,
                  max_position_embeddings=2048, layer_types=[SLIDING, SLIDING, SLIDING, FULL]),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=3,
                    position_embedding_size=256),
        canvas_length=16,
    ),
    # The released architecture scaled down; the benchmarks' reference figures use this shape.
    "small": dict(
        text=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, num_global_key_value_heads=1, head_dim=64, global_head_dim=128,
                  num_experts=16, top_k_experts=4, moe_intermediate_size=128, vocab_size=16384, sliding_window=128,
                  max_position_embeddings=8192),
        vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=64, patch_size=16, pooling_kernel_size=3,
                    position_embedding_size=256),
        canvas_length=64,
    ),
}

# The released checkpoint's sampling settings, so that a random model is driven the same way.
RELEASED_SAMPLING = dict(max_new_tokens=256, max_denoising_steps=48, sampler_config={"entropy_bound": 0.1},
                         t_min=0.4, t_max=0.8, stability_threshold=1, confidence_threshold=0.005)


@torch.no_grad()
def _randomize(model: DiffusionGemmaForBlockDiffusion, never_written: list[int]) -> None:
    for name, parameter in model.named_parameters():
        # Norms and scales start at exactly one; spreading them keeps layers and experts distinct.
        if "norm" in name or name.endswith("scale"):
            parameter.mul_(1 + 0.1 * torch.randn_like(parameter))
        # A table of ones gives every patch position the same embedding; rows of the size of the patch
        # projection's outputs let position and content both count.
        if name.endswith("position_embedding_table"):
            parameter.normal_(std=0.3)
    # A zero embedding row scores 0 everywhere, while the best of hundreds of random scores is positive, so the
    # model never writes image placeholders: a chat turn feeds the answer back as a prompt, where they need pixels.
    model.model.backbone.embed_tokens.weight[never_written] = 0


def write_random_checkpoint(folder: str | os.PathLike, preset: str, seed: int = 0) -> None:
    """Writes config.json, generation_config.json, model.safetensors, the tokenizer, the chat template and
    preprocessor_config.json (the image processor that fits the vision tower)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"{folder} already exists and is not an empty folder")
    spec = PRESETS[preset]
    special = write_tokenizer(folder, spec["text"]["vocab_size"])
    eos = [special["eos_token"], special["end_of_turn_token"]]
    text = DiffusionGemmaTextConfig(**spec["text"], pad_token_id=special["pad_token"],
                                    bos_token_id=special["bos_token"], eos_token_id=eos,
                                    use_bidirectional_attention="vision")
    vision = VisionConfig(**spec["vision"])
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision.to_dict(),
                                  canvas_length=spec["canvas_length"], boi_token_id=special["boi_token"],
                                  eoi_token_id=special["eoi_token"], image_token_id=special["image_token"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiffusionGemmaForBlockDiffusion(config).eval()
        _randomize(model, [special["boi_token"], special["eoi_token"], special["image_token"]])
    model.generation_config = DiffusionGemmaGenerationConfig(
        **RELEASED_SAMPLING, eos_token_id=eos, pad_token_id=special["pad_token"], bos_token_id=special["bos_token"])
    model.save_pretrained(folder)
    image_processor = ImageProcessor(patch_size=vision.patch_size, pooling_kernel_size=vision.pooling_kernel_size,
                                     max_soft_tokens=SOFT_TOKENS_PER_IMAGE)
    (folder / "preprocessor_config.json").write_text(json.dumps(image_processor.to_dict(), indent=2) + "\n")
