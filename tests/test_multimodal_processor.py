"""Chats with images through the processor, against the reference (transformers 5.23, test-only).

The expected inputs are built from the reference's tokenizer and `Gemma4ImageProcessorPil`: every image token
the chat template renders becomes boi + image_token x soft tokens + eoi, and `mm_token_type_ids` marks the
image tokens only (not boi/eoi), as `Gemma4Processor` marks them. The reference processor itself, built
without the video and audio halves that need torchvision, is checked against the same outputs.
"""

import base64
import io
import json

import numpy as np
import pytest
import torch
import transformers
from conftest import reference_processor
from PIL import Image
from transformers.models.gemma4.image_processing_pil_gemma4 import (
    Gemma4ImageProcessorPil,
)

from diffusiongemma.hf.processing import (
    DEFAULT_MAX_IMAGES,
    AutoProcessor,
    DiffusionGemmaProcessor,
)


def random_image(width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    return Image.fromarray(pixels)


SQUARE, WIDE, TALL, SMALL = (random_image(64, 64, 0), random_image(400, 60, 1), random_image(60, 300, 2),
                             random_image(20, 30, 3))


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image(picture):
    return {"type": "image", "image": picture}


def text(words):
    return {"type": "text", "text": words}


ONE = [{"role": "user", "content": [image(SQUARE), text("What is this?")]}]
TWO_IN_ONE_MESSAGE = [{"role": "user", "content": [text("Compare"), image(WIDE), text("with"), image(TALL)]}]
TWO_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [image(SMALL), text("Colour?")]},
    {"role": "assistant", "content": "Grey."},
    {"role": "user", "content": [text("And this one?"), image(WIDE)]},
]
TEXT_ONLY = [{"role": "user", "content": "No picture here."}]
CASES = {
    "one": (ONE, None),
    "two_in_one_message": (TWO_IN_ONE_MESSAGE, None),
    "two_messages": (TWO_MESSAGES, None),
    "batch_of_two_and_one": ([TWO_IN_ONE_MESSAGE, ONE], None),
    "batch_with_text_only": ([TEXT_ONLY, TWO_MESSAGES], None),
    "budget_70": ([ONE, TWO_IN_ONE_MESSAGE], 70),
    "budget_140": (TWO_MESSAGES, 140),
}


@pytest.fixture(scope="module")
def folder(tokenizer_folder):
    return tokenizer_folder


@pytest.fixture(scope="module")
def processor(folder):
    return DiffusionGemmaProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def ref_tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def ref_processor(folder):
    # A tokenizer of its own: this processor adds a video token to the one it is given.
    return reference_processor(transformers.AutoTokenizer.from_pretrained(folder), folder)


def expected_inputs(ref_tokenizer, conversations, budget):
    """Batch-first tensors built by hand from the reference tokenizer and image processor."""
    pictures = [
        part["image"] for messages in conversations for message in messages
        if isinstance(message["content"], list) for part in message["content"] if part["type"] == "image"
    ]
    expected, soft_tokens = {}, iter(())
    if pictures:
        processed = Gemma4ImageProcessorPil(max_soft_tokens=budget or 280)(pictures, return_tensors="pt")
        expected = {key: processed[key] for key in ("pixel_values", "image_position_ids")}
        soft_tokens = iter(processed["num_soft_tokens_per_image"])
    boi, image_id, eoi = ref_tokenizer.boi_token_id, ref_tokenizer.image_token_id, ref_tokenizer.eoi_token_id
    rows = []
    for messages in conversations:
        rows.append([])
        for token in ref_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                       return_dict=False):
            rows[-1] += ([boi] + [image_id] * int(next(soft_tokens)) + [eoi]) if token == image_id else [token]
    longest = max(map(len, rows))
    ids = torch.tensor([[ref_tokenizer.pad_token_id] * (longest - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in rows])
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == image_id).long(), **expected}


def assert_same_inputs(got, expected):
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        if key == "pixel_values":
            torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0)
        else:
            assert torch.equal(got[key], value), key


@pytest.mark.parametrize("case", CASES)
def test_images_match_reference(processor, ref_tokenizer, ref_processor, case):
    conversation, budget = CASES[case]
    batch = conversation if isinstance(conversation[0], list) else [conversation]
    kwargs = dict(tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True)
    got = processor.apply_chat_template(conversation, max_soft_tokens=budget, **kwargs)
    expected = expected_inputs(ref_tokenizer, batch, budget)
    assert_same_inputs(got, expected)
    reference = ref_processor.apply_chat_template(
        conversation, processor_kwargs={"max_soft_tokens": budget} if budget else None, **kwargs
    )
    assert_same_inputs(got, dict(reference))
    # Only the soft tokens are marked: boi and eoi sit beside them as text.
    boi, eoi = processor.tokenizer.boi_token_id, processor.tokenizer.eoi_token_id
    assert not got["mm_token_type_ids"][(got["input_ids"] == boi) | (got["input_ids"] == eoi)].any()
    assert got["pixel_values"].shape[1] == 9 * (budget or 280)


def test_rendering_keeps_one_image_token_per_image(processor, ref_processor):
    for conversation in (ONE, TWO_MESSAGES, [TWO_IN_ONE_MESSAGE, TEXT_ONLY]):
        rendered = processor.apply_chat_template(conversation, add_generation_prompt=True)
        assert rendered == ref_processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered[0].count("<image_soft_token>") == 2 and "<start_of_image>" not in rendered[0]


def test_return_forms(processor):
    batch = [TWO_IN_ONE_MESSAGE, ONE]
    tensors = processor.apply_chat_template(batch, tokenize=True, return_dict=True, return_tensors="pt")
    lists = processor.apply_chat_template(batch, tokenize=True, return_dict=True)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        assert lists[key] == tensors[key].tolist(), key
    for key in ("pixel_values", "image_position_ids"):
        assert torch.equal(lists[key], tensors[key]), key
    ids = processor.apply_chat_template(batch, tokenize=True, return_tensors="pt")
    assert torch.equal(ids, tensors["input_ids"])
    unpadded = processor.apply_chat_template(batch, tokenize=True, return_dict=True, padding=False)
    lengths = tensors["attention_mask"].sum(-1).tolist()
    assert [len(row) for row in unpadded["input_ids"]] == [len(row) for row in unpadded["mm_token_type_ids"]] == lengths
    assert unpadded["input_ids"][1] == tensors["input_ids"][1, -lengths[1]:].tolist()


@pytest.fixture
def image_sources(tmp_path):
    """Every way an image part can give WIDE, by name."""
    path = tmp_path / "wide.png"
    WIDE.save(path)
    encoded = base64.b64encode(png_bytes(WIDE)).decode()
    return {
        "pil": {"type": "image", "image": WIDE},
        "path_string": {"type": "image", "image": str(path)},
        "path_object": {"type": "image", "image": path},
        "path_key": {"type": "image", "path": str(path)},
        "bytes": {"type": "image", "image": png_bytes(WIDE)},
        "data_url": {"type": "image", "url": f"data:image/png;base64,{encoded}"},
        "base64_key": {"type": "image", "base64": encoded},
        "openai_image_url": {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}},
    }


def test_every_image_source_gives_the_same_inputs(processor, image_sources):
    def inputs(part):
        conversation = [{"role": "user", "content": [text("Look:"), part, image(SMALL)]}]
        return processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")

    expected = inputs(image_sources["pil"])
    for name, part in image_sources.items():
        got = inputs(part)
        assert list(got) == list(expected), name
        assert all(torch.equal(got[key], expected[key]) for key in expected), name


def test_direct_call_matches_the_chat_path_and_reference(processor, ref_processor):
    texts = processor.apply_chat_template([TWO_IN_ONE_MESSAGE, ONE], add_generation_prompt=True)
    chat = processor.apply_chat_template([TWO_IN_ONE_MESSAGE, ONE], add_generation_prompt=True, tokenize=True,
                                         return_dict=True, return_tensors="pt")
    call = dict(return_tensors="pt", add_special_tokens=False)
    nested = processor(texts, images=[[WIDE, TALL], [SQUARE]], **call)
    assert_same_inputs(nested, chat)
    assert_same_inputs(processor(texts, images=[WIDE, TALL, SQUARE], **call), chat)
    assert_same_inputs(nested, dict(ref_processor(text=texts, images=[[WIDE, TALL], [SQUARE]], **call)))
    single = processor("<image_soft_token> Describe.", images=SQUARE, return_tensors="pt", max_soft_tokens=70)
    assert_same_inputs(single, dict(ref_processor(text="<image_soft_token> Describe.", images=SQUARE,
                                                  return_tensors="pt", max_soft_tokens=70)))


def test_from_pretrained_reads_the_image_processor_config(folder, tmp_path):
    assert DiffusionGemmaProcessor.from_pretrained(folder).image_processor.max_soft_tokens == 280
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / name).write_text((folder / name).read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_soft_tokens": 70, "patch_size": 8}))
    processor = AutoProcessor.from_pretrained(tmp_path, max_images=3)
    assert (processor.image_processor.max_soft_tokens, processor.image_processor.patch_size) == (70, 8)
    assert processor.max_images == 3
    got = processor.apply_chat_template(ONE, tokenize=True, return_dict=True, return_tensors="pt")
    assert got["pixel_values"].shape == (1, 630, 3 * 8 * 8)


def test_text_only_tokenizer(folder, tmp_path):
    # A checkpoint without image tokens still gets (all-zero) mm_token_type_ids, and refuses images.
    for name in ("tokenizer.json", "chat_template.jinja"):
        (tmp_path / name).write_text((folder / name).read_text())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["extra_special_tokens"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    processor = DiffusionGemmaProcessor.from_pretrained(tmp_path)
    assert processor.image_token is None
    got = processor.apply_chat_template(TEXT_ONLY, tokenize=True, return_dict=True, return_tensors="pt")
    assert got["mm_token_type_ids"].shape == got["input_ids"].shape and not got["mm_token_type_ids"].any()
    with pytest.raises(ValueError, match="images need a tokenizer with a boi_token, an image_token and an eoi_token"):
        processor.apply_chat_template(ONE, tokenize=True)


def test_image_count_limit(folder, processor):
    assert processor.max_images == DEFAULT_MAX_IMAGES == 32
    small = DiffusionGemmaProcessor.from_pretrained(folder, max_images=2)
    three = [{"role": "user", "content": [image(SMALL), image(SMALL), image(SMALL)]}]
    small.apply_chat_template(TWO_IN_ONE_MESSAGE, tokenize=True)
    with pytest.raises(ValueError, match=r"prompt 1 has 3 images, more than max_images=2"):
        small.apply_chat_template([TWO_IN_ONE_MESSAGE, three], tokenize=True)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"max_images must be a positive integer, got {bad!r}"):
            DiffusionGemmaProcessor(processor.tokenizer, max_images=bad)


def test_bad_images_are_named(processor):
    unreadable = [{"role": "user", "content": [image(SMALL), image(b"not an image")]}]
    with pytest.raises(ValueError, match="image 1 of prompt 0: could not read an image from the given bytes"):
        processor.apply_chat_template(unreadable, tokenize=True)
    empty = [{"role": "user", "content": [text("Empty:"), image(Image.new("RGB", (0, 10)))]}]
    with pytest.raises(ValueError, match=r"image 0 of prompt 1: image has zero size \(0x10\)"):
        processor.apply_chat_template([ONE, empty], tokenize=True)
    with pytest.raises(ValueError, match="image 0 of prompt 0: an image must be a PIL image"):
        processor("<image_soft_token>", images=[[[SMALL]]])
    with pytest.raises(ValueError, match=r"max_soft_tokens must be one of \(70, 140, 280, 560, 1120\), got 100"):
        processor.apply_chat_template(ONE, tokenize=True, max_soft_tokens=100)


def test_image_parts_need_one_source(processor):
    for part in ({"type": "image"}, {"type": "image", "image": SMALL, "url": "x.png"},
                 {"type": "image_url", "image_url": {}}):
        with pytest.raises(ValueError, match=r"an image part needs exactly one of the keys \('image', 'url', 'path'"):
            processor.apply_chat_template([{"role": "user", "content": [part]}])
    with pytest.raises(ValueError, match=r"got keys \['type'\]"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(ValueError, match="content parts must look like"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}])


def test_image_tokens_must_match_images(processor):
    with pytest.raises(ValueError, match=r"expected 2 images \(one per image token in the prompts\), got 1"):
        processor("<image_soft_token> and <image_soft_token>", images=[SMALL])
    with pytest.raises(ValueError, match=r"expected 1 images \(one per image token in the prompts\), got 0"):
        processor("a literal <image_soft_token> in the text")
    with pytest.raises(ValueError, match=r"expected \[1, 0\] images per prompt \(one per image token\), got \[0, 1\]"):
        processor(["<image_soft_token>", "none"], images=[[], [SMALL]])
    # A template that drops image parts leaves images without tokens.
    template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(ValueError, match=r"expected \[0\] images per prompt \(one per image token\), got \[1\]"):
        processor.apply_chat_template(ONE, tokenize=True, chat_template=template)
