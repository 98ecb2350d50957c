"""Chat prompts: render a checkpoint's Jinja chat template, tokenize the result and prepare its images."""

import json
from dataclasses import replace
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import torch
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .image_processing import ImageProcessor
from .loading import resolve_folder
from .tokenizer import TOKENIZER_FILES, DiffusionGemmaTokenizer

PROCESSOR_FILES = ["processor_config.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja"]
# The keys the reference reads an image part's source from.
IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")
# Each image costs up to max_soft_tokens prompt tokens and max_soft_tokens * 9 patches of pixels, so an
# unbounded count would let one request exhaust memory.
DEFAULT_MAX_IMAGES = 32


def _raise_exception(message: str):
    raise ValueError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Unlike Jinja's own filter, this one leaves HTML characters unescaped and keeps non-ASCII text readable.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=8)
def _compile(chat_template: str) -> jinja2.Template:
    # Templates come from downloaded checkpoints, so they run sandboxed and cannot mutate their inputs.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(chat_template)


def read_chat_template(folder: Path) -> str | None:
    """The folder's chat template, searched where the reference searches and in its order of priority."""
    for name in ("processor_config.json", "chat_template.json"):
        path = folder / name
        if path.is_file() and (template := json.loads(path.read_text(encoding="utf-8")).get("chat_template")):
            return template
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")).get("chat_template") if path.is_file() else None


def _checked_part(part) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return part
    if kind == "image_url":
        # OpenAI-style part, rewritten to the Hugging Face form as the reference does.
        url = part.get("image_url")
        part = {"type": "image", "url": url.get("url") if isinstance(url, dict) else url}
    elif kind != "image":
        raise ValueError(
            "content parts must look like {'type': 'text', 'text': str} or {'type': 'image', 'image': ...}, "
            f"got {repr(part)[:200]}"
        )
    keys = sorted(key for key, value in part.items() if value is not None)
    if len(set(keys) & set(IMAGE_SOURCE_KEYS)) != 1:
        raise ValueError(f"an image part needs exactly one of the keys {IMAGE_SOURCE_KEYS}, got keys {keys}")
    return part


def _checked_message(message) -> dict:
    """A message with its `None` fields dropped; the single place that decides which content parts are accepted."""
    if not isinstance(message, dict) or "role" not in message:
        raise ValueError(f"each message must be a dict with a 'role' and a 'content', got {message!r}")
    message = {key: value for key, value in message.items() if value is not None}
    content = message.get("content", "")
    if isinstance(content, str):
        return message
    if not isinstance(content, list):
        raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    return {**message, "content": [_checked_part(part) for part in content]}


def _open_final_message(text: str, messages: list[dict]) -> str:
    """`text`, a rendered conversation, cut right after the text of its final message."""
    content = messages[-1].get("content", "")
    pieces = [content] if isinstance(content, str) else [part["text"] for part in content if part["type"] == "text"]
    final = pieces[-1] if pieces else ""
    if not final.strip():
        raise ValueError("continue_final_message needs a final message that ends in text to continue")
    # Templates commonly trim a message; the last place its trimmed text appears is the final message's.
    start = text.rfind(final.strip())
    if start < 0:
        raise ValueError("continue_final_message: the chat template does not write the final message's text as "
                         "it is, so there is no place to continue it from")
    # Where the template kept the message's trailing whitespace, so does the continuation.
    kept = final.lstrip()
    end = start + len(kept) if text.startswith(kept, start) else start + len(final.strip())
    return text[:end]


def _image_sources(messages: list[dict]) -> list:
    """The images of checked messages, in prompt order."""
    parts = [part for message in messages if isinstance(message.get("content"), list) for part in message["content"]]
    sources = []
    for part in filter(lambda part: part["type"] == "image", parts):
        key = next(key for key in IMAGE_SOURCE_KEYS if part.get(key) is not None)
        # A bare base64 payload becomes a data: URL, a form the image loader decodes.
        bare_base64 = key == "base64" and isinstance(part[key], str) and not part[key].startswith("data:")
        sources.append(f"data:;base64,{part[key]}" if bare_base64 else part[key])
    return sources


class DiffusionGemmaProcessor:
    """Turns chat conversations (text and images) into model inputs and generated ids back into text."""

    def __init__(
        self,
        tokenizer: DiffusionGemmaTokenizer,
        chat_template: str | None = None,
        image_processor: ImageProcessor | None = None,
        max_images: int = DEFAULT_MAX_IMAGES,
    ):
        if not isinstance(max_images, int) or isinstance(max_images, bool) or max_images < 1:
            raise ValueError(f"max_images must be a positive integer, got {max_images!r}")
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        # Text-only checkpoints define none of these.
        self.boi_token, self.image_token, self.eoi_token, self.image_token_id = (
            getattr(tokenizer, name, None) for name in ("boi_token", "image_token", "eoi_token", "image_token_id")
        )
        self.image_processor = ImageProcessor() if image_processor is None else image_processor
        self.max_images = max_images

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | Path, max_images: int = DEFAULT_MAX_IMAGES
    ) -> "DiffusionGemmaProcessor":
        folder = Path(resolve_folder(path_or_repo_id, TOKENIZER_FILES + PROCESSOR_FILES))
        tokenizer = DiffusionGemmaTokenizer.from_pretrained(folder)
        return cls(tokenizer, read_chat_template(folder), ImageProcessor.from_pretrained(folder), max_images)

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
        padding: bool | str = True,
        chat_template: str | None = None,
        max_soft_tokens: int | None = None,
        continue_final_message: bool = False,
        **template_kwargs,
    ):
        """Render one conversation (a list of messages) or a batch of them with the chat template.

        Without `tokenize`, returns the text (a list of texts for a batch), one image token per image part.
        With it, returns `input_ids` batch-first (one row even for a single conversation, as the reference
        processor does), left-padded unless `padding=False`, each image token expanded to the image's soft
        tokens; with `return_dict`, everything `__call__` returns. Image parts are `{"type": "image", key: source}`
        with `key` one of `IMAGE_SOURCE_KEYS`, or OpenAI's `{"type": "image_url", "image_url": {"url": source}}`.
        `continue_final_message` ends the text right after the final message's text, leaving out what the
        template writes to close that message, so that generation continues it (say, a partly written answer).
        Extra keyword arguments become template variables.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this processor has no chat template: pass chat_template= or add chat_template.jinja")
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError("conversation must be a non-empty list of messages, or a list of such lists")
        batched = isinstance(conversation[0], (list, tuple))
        conversations = [
            [_checked_message(m) for m in messages] for messages in (conversation if batched else [conversation])
        ]
        variables = {
            "tools": None,
            "documents": None,
            **self.tokenizer.special_tokens_map,
            **template_kwargs,
            "add_generation_prompt": add_generation_prompt,
        }
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt exclude each other: the first "
                             "continues the final message, the second starts a new one")
        texts = [_compile(template).render(messages=messages, **variables) for messages in conversations]
        if continue_final_message:
            texts = [_open_final_message(text, messages) for text, messages in zip(texts, conversations)]
        if not tokenize:
            return texts if batched else texts[0]
        # Like the reference, add BOS only when the template did not write one itself.
        bos = self.tokenizer.bos_token
        encoded = self(
            texts,
            images=[_image_sources(messages) for messages in conversations],
            max_soft_tokens=max_soft_tokens,
            padding=padding,
            return_tensors=return_tensors,
            add_special_tokens=bos is None or not texts[0].startswith(bos),
        )
        return encoded if return_dict else encoded["input_ids"]

    def __call__(
        self,
        text: str | list[str],
        images=None,
        max_soft_tokens: int | None = None,
        padding: bool | str = True,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> dict:
        """Model inputs for prompt texts that hold one image token per image.

        `images`: one image, a flat list in prompt order across the batch, or one list per text; each image is
        anything `load_image` reads. Returns batch-first `input_ids`, `attention_mask` and `mm_token_type_ids`
        (1 on image soft tokens, 0 elsewhere), and when there are images `pixel_values` float32
        [images, max_patches, 3 * patch_size**2] and `image_position_ids` int64 [images, max_patches, 2].
        """
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a non-empty list of strings")
        image_processor = self.image_processor
        if max_soft_tokens is not None:
            image_processor = replace(image_processor, max_soft_tokens=max_soft_tokens)
        processed = self._process_images(self._images_per_text(texts, images), image_processor)
        soft_tokens = iter(n for out in processed for n in out["num_soft_tokens_per_image"])
        texts = [self._expand_image_tokens(t, soft_tokens) for t in texts]
        encoded = self.tokenizer(
            texts, padding=padding, return_tensors=return_tensors, add_special_tokens=add_special_tokens
        )
        ids = encoded["input_ids"]
        rows = ids.tolist() if torch.is_tensor(ids) else ids
        types = [[int(token == self.image_token_id) for token in row] for row in rows]
        encoded["mm_token_type_ids"] = torch.tensor(types, dtype=torch.long) if torch.is_tensor(ids) else types
        if processed:
            encoded["pixel_values"] = torch.cat([out["pixel_values"] for out in processed])
            encoded["image_position_ids"] = torch.cat([out["image_position_ids"] for out in processed])
        return encoded

    def _images_per_text(self, texts: list[str], images) -> list[list]:
        images = [] if images is None else images if isinstance(images, (list, tuple)) else [images]
        nested = bool(images) and all(isinstance(group, (list, tuple)) for group in images)
        given = [len(group) for group in images] if nested else [len(images)]
        if sum(given) and None in (self.boi_token, self.image_token, self.eoi_token):
            raise ValueError("images need a tokenizer with a boi_token, an image_token and an eoi_token")
        wanted = [t.count(self.image_token) for t in texts] if self.image_token else [0] * len(texts)
        if nested and given != wanted:
            raise ValueError(f"expected {wanted} images per prompt (one per image token), got {given}")
        if not nested and sum(given) != sum(wanted):
            raise ValueError(f"expected {sum(wanted)} images (one per image token in the prompts), got {sum(given)}")
        flat = iter(image for group in images for image in group) if nested else iter(images)
        groups = [[next(flat) for _ in range(n)] for n in wanted]
        for index, group in enumerate(groups):
            if len(group) > self.max_images:
                raise ValueError(f"prompt {index} has {len(group)} images, more than max_images={self.max_images}")
        return groups

    @staticmethod
    def _process_images(groups: list[list], image_processor: ImageProcessor) -> list[dict]:
        processed = []
        for prompt, group in enumerate(groups):
            for index, image in enumerate(group):
                try:
                    # Wrapped in a list, so that a nested list cannot pass for several images.
                    processed.append(image_processor([image]))
                except ValueError as err:
                    raise ValueError(f"image {index} of prompt {prompt}: {err}") from err
        return processed

    def _expand_image_tokens(self, text: str, soft_tokens) -> str:
        if self.image_token is None:
            return text
        head, *rest = text.split(self.image_token)
        pieces = [head]
        for piece in rest:
            pieces += [self.boi_token, self.image_token * next(soft_tokens), self.eoi_token, piece]
        return "".join(pieces)

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs):
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)


class AutoProcessor:
    """Name-compatible entry point: `AutoProcessor.from_pretrained(...)` gives a `DiffusionGemmaProcessor`."""

    @staticmethod
    def from_pretrained(path_or_repo_id: str | Path, max_images: int = DEFAULT_MAX_IMAGES) -> DiffusionGemmaProcessor:
        return DiffusionGemmaProcessor.from_pretrained(path_or_repo_id, max_images)
