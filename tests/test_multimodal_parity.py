"""Images end to end: processor, vision tower, bidirectional image attention, generate; against the reference."""

import json

import numpy as np
import pytest
import torch
from conftest import make_reference
from PIL import Image

from diffusiongemma import AutoProcessor, DiffusionGemmaForBlockDiffusion
from diffusiongemma.hf.chat_fixture import write_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(reference, ours, processor) sharing the project-made tokenizer's image token ids."""
    folder = tmp_path_factory.mktemp("multimodal")
    ids = write_tokenizer(folder, 384)
    reference = make_reference(image_token_ids=(ids["boi_token"], ids["eoi_token"], ids["image_token"]))
    reference.save_pretrained(folder)
    # The tiny vision tower uses 4-pixel patches; the smallest soft-token budget keeps images small.
    (folder / "preprocessor_config.json").write_text(json.dumps({"patch_size": 4, "max_soft_tokens": 70}))
    return reference, DiffusionGemmaForBlockDiffusion.from_pretrained(folder), AutoProcessor.from_pretrained(folder)


def image(height, width, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


CHATS = {
    "one image": [{"role": "user", "content": [{"type": "image", "image": image(40, 60, 0)},
                                               {"type": "text", "text": "What is this?"}]}],
    "two images": [{"role": "user", "content": [{"type": "text", "text": "Compare"},
                                                {"type": "image", "image": image(30, 90, 1)},
                                                {"type": "text", "text": "with"},
                                                {"type": "image", "image": image(70, 35, 2)}]}],
}


def reference_masks(reference, inputs):
    """The encoder masks the reference's `generate` builds (its `forward` alone ignores image blocks)."""
    embeds = torch.empty(*inputs["input_ids"].shape, 0)
    return reference.model.encoder.create_masks_for_generate(
        config=reference.config, inputs_embeds=embeds, attention_mask=inputs["attention_mask"].bool(),
        past_key_values=None, position_ids=None, mm_token_type_ids=inputs["mm_token_type_ids"])


@pytest.mark.parametrize("chat", list(CHATS))
@torch.no_grad()
def test_first_decoder_step_logits(models, chat):
    reference, ours, processor = models
    inputs = processor.apply_chat_template(CHATS[chat], add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    assert inputs["mm_token_type_ids"].sum() > 0
    canvas = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    images = dict(pixel_values=inputs["pixel_values"], image_position_ids=inputs["image_position_ids"])
    expected = reference(input_ids=inputs["input_ids"], attention_mask=reference_masks(reference, inputs),
                         decoder_input_ids=canvas, **images).logits
    actual = ours(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                  mm_token_type_ids=inputs["mm_token_type_ids"], decoder_input_ids=canvas, **images).logits
    assert (actual - expected).abs().max() / expected.abs().max() < 1e-5
    # Image tokens attending to each other matters: the plain causal encoder gives other logits.
    causal = ours(input_ids=inputs["input_ids"], decoder_input_ids=canvas, **images).logits
    assert (causal - expected).abs().max() > 1e-4


@pytest.mark.parametrize("chat", list(CHATS))
def test_generate_same_tokens(models, chat):
    reference, ours, processor = models
    inputs = processor.apply_chat_template(CHATS[chat], add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    outputs = []
    for model in (reference, ours):
        torch.manual_seed(11)
        outputs.append(model.generate(**inputs, max_new_tokens=16, max_denoising_steps=4))
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    assert torch.equal(outputs[0].tokens_per_forward, outputs[1].tokens_per_forward)


def test_image_token_mismatches_are_named(models):
    _, ours, processor = models
    inputs = processor.apply_chat_template(CHATS["one image"], add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    with pytest.raises(ValueError, match="image tokens but no `pixel_values`"):
        ours.generate(inputs["input_ids"], max_new_tokens=8, max_denoising_steps=2)
    doubled = torch.cat([inputs["pixel_values"]] * 2)
    positions = torch.cat([inputs["image_position_ids"]] * 2)
    count = int(inputs["mm_token_type_ids"].sum())
    with pytest.raises(ValueError, match=f"has {count} image tokens but the images give {2 * count} soft tokens"):
        ours(input_ids=inputs["input_ids"], pixel_values=doubled, image_position_ids=positions,
             decoder_input_ids=torch.zeros(1, 8, dtype=torch.long))
