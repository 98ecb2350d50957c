"""The image processor against the reference Gemma4ImageProcessorPil (transformers, test-only)."""

import base64
import functools
import http.server
import io
import json
import socket
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.gemma4.image_processing_pil_gemma4 import (
    Gemma4ImageProcessorPil,
)

from diffusiongemma.hf.image_processing import ImageProcessor, load_image


def random_image(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    # Smooth gradients as well as noise, so resampling differences cannot hide.
    pixels[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def palette_with_transparency():
    image = random_image(33, 21, seed=5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 3
    return image


IMAGES = {
    "tiny": random_image(5, 7, seed=1),
    "wide": random_image(400, 60, seed=2),
    "tall": random_image(60, 400, seed=3),
    "large": random_image(900, 700, seed=4),
    "grey": random_image(123, 77, "L", seed=6),
    "rgba": random_image(150, 100, "RGBA", seed=7),
    "palette": palette_with_transparency(),
    "sliver": random_image(1000, 2, seed=8),
}


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def assert_same(ours, reference):
    assert ours["pixel_values"].dtype == torch.float32
    assert ours["image_position_ids"].dtype == torch.int64
    torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"].float(), atol=1e-6, rtol=0)
    assert torch.equal(ours["image_position_ids"], reference["image_position_ids"])
    assert ours["num_soft_tokens_per_image"] == list(map(int, reference["num_soft_tokens_per_image"]))


@pytest.mark.parametrize("budget", [70, 280])
def test_matches_reference_on_a_mixed_batch(budget):
    images = list(IMAGES.values())
    reference = Gemma4ImageProcessorPil(max_soft_tokens=budget)(images, return_tensors="pt")
    ours = ImageProcessor(max_soft_tokens=budget)(images)
    assert ours["pixel_values"].shape == (len(images), budget * 9, 3 * 16 * 16)
    assert_same(ours, reference)
    assert all(n <= budget for n in ours["num_soft_tokens_per_image"])


@pytest.mark.parametrize("name", ["tiny", "large", "grey"])
def test_matches_reference_one_image_at_a_time_with_budget_override(name):
    reference = Gemma4ImageProcessorPil(max_soft_tokens=140)(IMAGES[name], return_tensors="pt")
    assert_same(ImageProcessor()(IMAGES[name], max_soft_tokens=140), reference)


def test_matches_reference_with_normalisation_and_other_settings():
    settings = dict(do_normalize=True, image_mean=[0.5, 0.4, 0.3], image_std=[0.5, 0.25, 2.0], resample=2,
                    patch_size=8, pooling_kernel_size=2, max_soft_tokens=70)
    images = [IMAGES["wide"], IMAGES["rgba"]]
    reference = Gemma4ImageProcessorPil(**settings)(images, return_tensors="pt")
    assert_same(ImageProcessor.from_dict(settings)(images), reference)


@pytest.mark.parametrize("name", ["large", "rgba"])
def test_every_input_form_gives_the_same_result(tmp_path, name):
    data = png_bytes(IMAGES[name])
    path = tmp_path / "image.png"
    path.write_bytes(data)
    data_url = "data:image/png;base64," + base64.b64encode(data).decode()
    processor = ImageProcessor(max_soft_tokens=70)
    results = [processor(source) for source in (str(path), path, data, data_url, Image.open(io.BytesIO(data)))]
    # File-like sources are read as the reference reads a path; compare that to the reference too.
    assert_same(results[0], Gemma4ImageProcessorPil(max_soft_tokens=70)(str(path), return_tensors="pt"))
    if name == "large":
        assert_same(results[0], Gemma4ImageProcessorPil(max_soft_tokens=70)(IMAGES[name], return_tensors="pt"))
    for result in results[1:-1]:
        assert_same(result, results[0])
    if name == "large":
        assert_same(results[-1], results[0])


def test_download_and_its_failures(tmp_path):
    (tmp_path / "image.png").write_bytes(png_bytes(IMAGES["tall"]))

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(tmp_path))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        processor = ImageProcessor(max_soft_tokens=70)
        assert_same(processor(f"{base}/image.png"), processor(IMAGES["tall"]))
        with pytest.raises(ValueError, match=f"could not download image {base}/missing.png"):
            processor(f"{base}/missing.png")
        with pytest.raises(ValueError, match="larger than the 100-byte download limit"):
            load_image(f"{base}/image.png", max_bytes=100)
    finally:
        server.shutdown()
        server.server_close()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{closed_port}/offline.png"
    with pytest.raises(ValueError, match=f"could not download image {url}"):
        load_image(url, timeout=5)


@pytest.mark.parametrize(
    "images, message",
    [
        (Image.new("RGB", (0, 5)), "zero size"),
        (b"definitely not an image", "could not read an image from the given bytes"),
        ("/no/such/file.png", "is not an existing file, an http\\(s\\) URL or a data: URL"),
        ("data:image/png,rawdata", "data: URL must look like"),
        ("data:image/png;base64,@@@@", "does not hold valid base64"),
        ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "could not read an image"),
        (42, "an image must be a PIL image"),
        ([], "at least one image"),
    ],
)
def test_bad_images_raise_value_error(images, message):
    with pytest.raises(ValueError, match=message):
        ImageProcessor()(images)


def test_bad_settings_raise_value_error():
    with pytest.raises(ValueError, match=r"max_soft_tokens must be one of \(70, 140, 280, 560, 1120\), got 100"):
        ImageProcessor(max_soft_tokens=100)
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        ImageProcessor()(IMAGES["tiny"], max_soft_tokens=300)
    with pytest.raises(ValueError, match="patch_size must be a positive integer"):
        ImageProcessor.from_dict({"patch_size": 0})
    with pytest.raises(ValueError, match="image_std must be a number or 3 numbers"):
        ImageProcessor.from_dict({"image_std": [1.0, 1.0]})
    with pytest.raises(ValueError, match="resample must be"):
        ImageProcessor.from_dict({"resample": 9})
    with pytest.raises(ValueError, match="expected a Gemma4ImageProcessor config"):
        ImageProcessor.from_dict({"image_processor_type": "SiglipImageProcessor"})
    with pytest.raises(ValueError, match="images must be RGB"):
        ImageProcessor(do_convert_rgb=False)(IMAGES["grey"])
    with pytest.raises(ValueError, match="turn do_resize on"):
        ImageProcessor(do_resize=False)(IMAGES["tiny"])


def test_settings_come_from_checkpoint_files(tmp_path):
    assert ImageProcessor.from_pretrained(tmp_path) == ImageProcessor()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Gemma4ImageProcessor", "max_soft_tokens": 560, "size": {"height": 224}}
    ))
    assert ImageProcessor.from_pretrained(tmp_path).max_soft_tokens == 560
    (tmp_path / "processor_config.json").write_text(json.dumps({
        "processor_class": "Gemma4Processor", "image_seq_length": 140,
        "image_processor": {"image_processor_type": "Gemma4ImageProcessor", "max_soft_tokens": 140,
                            "resample": 3, "rescale_factor": 0.00392156862745098, "image_seq_length": 140},
    }))
    processor = ImageProcessor.from_pretrained(str(tmp_path))
    assert processor.max_soft_tokens == 140
    assert ImageProcessor.from_dict(processor.to_dict()) == processor
    with pytest.raises(ValueError, match="is not a directory"):
        ImageProcessor.from_pretrained(tmp_path / "missing")


def test_defaults_match_reference():
    reference = Gemma4ImageProcessorPil()
    for key, value in ImageProcessor().to_dict().items():
        if key != "image_processor_type":
            expected = getattr(reference, key)
            assert (list(expected) if isinstance(expected, (list, tuple)) else expected) == value, key
