"""Turns images into the padded patch sequences the vision tower reads.

Each image is resized, keeping its aspect ratio, to the largest size whose sides are multiples of
``pooling_kernel_size * patch_size`` and which fits ``max_soft_tokens * pooling_kernel_size**2`` patches,
scaled to [0, 1], cut into ``patch_size x patch_size`` patches (row-major, each patch flattened as
row, column, channel) and padded to the budget's patch count. A patch's position id is its (column, row);
padding patches get (-1, -1).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import json
import math
import os
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["ImageProcessor", "load_image", "SUPPORTED_SOFT_TOKENS"]

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
DOWNLOAD_TIMEOUT_S = 30.0
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024

_USER_AGENT = "diffusiongemma-image-loader"


def load_image(source, *, timeout: float = DOWNLOAD_TIMEOUT_S, max_bytes: int = MAX_DOWNLOAD_BYTES) -> Image.Image:
    """A PIL image from a PIL image (returned as is), a file path, a ``data:`` URL, raw file bytes or an
    http(s) URL. Everything but a PIL image is opened the way the reference loads image URLs: EXIF
    orientation applied, then converted to RGB (which drops an alpha channel rather than blending it)."""
    if isinstance(source, Image.Image):
        try:
            source.load()
        except (OSError, ValueError, SyntaxError) as err:
            raise ValueError(f"could not read the given PIL image: {err}") from err
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "the given bytes"
    elif isinstance(source, (str, os.PathLike)):
        data, name = _read_source(os.fspath(source), timeout, max_bytes)
    else:
        raise ValueError(
            "an image must be a PIL image, a file path, a data: URL, an http(s) URL or bytes, "
            f"got {type(source).__name__}"
        )
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"could not read an image from {name}: {err}") from err


def _read_source(source: str, timeout: float, max_bytes: int) -> tuple[bytes, str]:
    if source.startswith(("http://", "https://")):
        return _download(source, timeout, max_bytes), source
    if source.startswith("data:"):
        return _decode_data_url(source), "a data: URL"
    if not os.path.isfile(source):
        raise ValueError(f"image {source[:200]!r} is not an existing file, an http(s) URL or a data: URL")
    return Path(source).read_bytes(), source


def _download(url: str, timeout: float, max_bytes: int) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(max_bytes + 1)
    except (OSError, ValueError, http.client.HTTPException) as err:
        raise ValueError(f"could not download image {url}: {err}") from err
    if len(data) > max_bytes:
        raise ValueError(f"image {url} is larger than the {max_bytes}-byte download limit")
    return data


def _decode_data_url(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ValueError(f"a data: URL must look like 'data:image/png;base64,<data>', got {url[:60]!r}...")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as err:
        raise ValueError(f"the data: URL does not hold valid base64: {err}") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency blended onto white."""
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    image = image.convert("RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image).convert("RGB")


def target_size(
    height: int, width: int, patch_size: int, max_patches: int, pooling_kernel_size: int
) -> tuple[int, int]:
    """The (height, width) an image is resized to: the largest aspect-preserving size with sides that are
    multiples of a pooling block and at most ``max_patches`` patches."""
    block = pooling_kernel_size * patch_size
    scale = math.sqrt(max_patches * patch_size**2 / (height * width))
    new_height = math.floor(scale * height / block) * block
    new_width = math.floor(scale * width / block) * block
    # A very thin image still gets one block across its short side; its long side is capped at the
    # length the whole budget makes as a single row of blocks.
    longest = (max_patches // pooling_kernel_size**2) * block
    if new_height == 0:
        new_height, new_width = block, min(width // height * block, longest)
    elif new_width == 0:
        new_height, new_width = min(height // width * block, longest), block
    return new_height, new_width


@dataclass(frozen=True)
class ImageProcessor:
    patch_size: int = 16
    max_soft_tokens: int = 280
    pooling_kernel_size: int = 3
    do_resize: bool = True
    resample: int = Image.Resampling.BICUBIC.value
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: tuple = (0.0, 0.0, 0.0)
    image_std: tuple = (1.0, 1.0, 1.0)
    do_convert_rgb: bool = True

    def __post_init__(self):
        for name in ("patch_size", "pooling_kernel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        _check_budget(self.max_soft_tokens)
        for name in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.resample not in {r.value for r in Image.Resampling}:
            raise ValueError(f"resample must be a PIL resampling filter number (0-5), got {self.resample!r}")
        if not _is_number(self.rescale_factor) or self.rescale_factor <= 0:
            raise ValueError(f"rescale_factor must be a positive number, got {self.rescale_factor!r}")
        object.__setattr__(self, "image_mean", _per_channel("image_mean", self.image_mean))
        object.__setattr__(self, "image_std", _per_channel("image_std", self.image_std))
        if 0 in self.image_std:
            raise ValueError(f"image_std must not hold a zero, got {self.image_std}")

    @classmethod
    def from_dict(cls, config: Mapping) -> ImageProcessor:
        """Settings from an image processor dict; keys this processor does not use (``size``,
        ``image_seq_length``, ``processor_class``...) are ignored, as the reference ignores them."""
        if not isinstance(config, Mapping):
            raise ValueError(f"an image processor config must be a dict, got {type(config).__name__}")
        kind = config.get("image_processor_type", "Gemma4ImageProcessor")
        if not str(kind).startswith("Gemma4ImageProcessor"):
            raise ValueError(f"expected a Gemma4ImageProcessor config, got image_processor_type {kind!r}")
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in config.items() if k in names and v is not None})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> ImageProcessor:
        """Settings from a checkpoint folder: the ``image_processor`` entry of ``processor_config.json``
        if there is one, else ``preprocessor_config.json``, else the defaults."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"{str(folder)!r} is not a directory")
        processor_file, preprocessor_file = folder / "processor_config.json", folder / "preprocessor_config.json"
        if processor_file.is_file():
            nested = _read_json(processor_file).get("image_processor")
            if nested is not None:
                return cls.from_dict(nested)
        if preprocessor_file.is_file():
            return cls.from_dict(_read_json(preprocessor_file))
        return cls()

    def to_dict(self) -> dict:
        out = asdict(self)
        out["image_mean"], out["image_std"] = list(self.image_mean), list(self.image_std)
        return {"image_processor_type": "Gemma4ImageProcessor", **out}

    def __call__(self, images, max_soft_tokens: int | None = None) -> dict:
        """images: one image or a list (each anything ``load_image`` takes). Returns ``pixel_values``
        float32 [images, max_patches, 3 * patch_size**2], ``image_position_ids`` int64
        [images, max_patches, 2] and ``num_soft_tokens_per_image`` (list of int)."""
        budget = self.max_soft_tokens if max_soft_tokens is None else max_soft_tokens
        _check_budget(budget)
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("expected at least one image, got an empty list")
        max_patches = budget * self.pooling_kernel_size**2
        patches, positions, soft_tokens = zip(*(self._patchify(load_image(img), max_patches) for img in images))
        return {
            "pixel_values": torch.from_numpy(np.stack(patches)),
            "image_position_ids": torch.from_numpy(np.stack(positions)),
            "num_soft_tokens_per_image": list(soft_tokens),
        }

    def _patchify(self, image: Image.Image, max_patches: int) -> tuple[np.ndarray, np.ndarray, int]:
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image has zero size ({image.width}x{image.height})")
        if self.do_convert_rgb:
            image = to_rgb(image)
        elif image.mode != "RGB":
            raise ValueError(f"do_convert_rgb is off, so images must be RGB; got mode {image.mode!r}")
        if self.do_resize:
            height, width = target_size(image.height, image.width, self.patch_size, max_patches,
                                        self.pooling_kernel_size)
            if (height, width) != (image.height, image.width):
                image = image.resize((width, height), resample=self.resample)
        p, block = self.patch_size, self.patch_size * self.pooling_kernel_size
        rows, cols = image.height // p, image.width // p
        if image.height % block or image.width % block or rows * cols > max_patches:
            raise ValueError(
                f"a {image.width}x{image.height} image does not fit {max_patches} patches of {p}x{p} "
                f"with sides in multiples of {block}; turn do_resize on"
            )
        patches = self._pixels(image).reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
        index = np.arange(rows * cols)
        grid = np.stack([index % cols, index // cols], axis=-1)
        padded_patches = np.zeros((max_patches, patches.shape[1]), dtype=np.float32)
        padded_patches[: len(patches)] = patches
        padded_grid = np.full((max_patches, 2), -1, dtype=np.int64)
        padded_grid[: len(grid)] = grid
        return padded_patches, padded_grid, rows * cols // self.pooling_kernel_size**2

    def _pixels(self, image: Image.Image) -> np.ndarray:
        """[height, width, 3] float32, computed in the reference's precisions (rescale in float64)."""
        pixels = np.asarray(image)
        if self.do_rescale:
            pixels = pixels.astype(np.float64) * self.rescale_factor
        pixels = pixels.astype(np.float32)
        if self.do_normalize:
            pixels = (pixels - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        return pixels


def _check_budget(max_soft_tokens) -> None:
    if not isinstance(max_soft_tokens, int) or isinstance(max_soft_tokens, bool) or (
        max_soft_tokens not in SUPPORTED_SOFT_TOKENS
    ):
        raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {max_soft_tokens!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _per_channel(name: str, value) -> tuple:
    values = (value,) * 3 if _is_number(value) else value
    if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(map(_is_number, values)):
        raise ValueError(f"{name} must be a number or 3 numbers (one per RGB channel), got {value!r}")
    return tuple(float(v) for v in values)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"could not read {path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data
