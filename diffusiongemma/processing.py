"""Chat prompts: render a checkpoint's Jinja chat template and tokenize the result."""

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import TOKENIZER_FILES, DiffusionGemmaTokenizer, snapshot_folder

CHAT_TEMPLATE_FILES = ["processor_config.json", "chat_template.json", "chat_template.jinja"]


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


def _checked_message(message) -> dict:
    """A message with its `None` fields dropped; the single place that decides which content parts are accepted."""
    if not isinstance(message, dict) or "role" not in message:
        raise ValueError(f"each message must be a dict with a 'role' and a 'content', got {message!r}")
    message = {key: value for key, value in message.items() if value is not None}
    content = message.get("content", "")
    parts = [] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("image", "image_url"):
            raise NotImplementedError("image inputs are not supported yet: send text-only messages")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"content parts must look like {{'type': 'text', 'text': str}}, got {part!r}")
    return message


class DiffusionGemmaProcessor:
    """Turns chat conversations into model inputs and generated ids back into text."""

    def __init__(self, tokenizer: DiffusionGemmaTokenizer, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path) -> "DiffusionGemmaProcessor":
        folder = snapshot_folder(path_or_repo_id, TOKENIZER_FILES + CHAT_TEMPLATE_FILES)
        return cls(DiffusionGemmaTokenizer.from_pretrained(folder), read_chat_template(folder))

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
        padding: bool | str = True,
        chat_template: str | None = None,
        **template_kwargs,
    ):
        """Render one conversation (a list of messages) or a batch of them with the chat template.

        Without `tokenize`, returns the text (a list of texts for a batch). With it, returns `input_ids`
        batch-first (one row even for a single conversation, as the reference processor does), left-padded
        unless `padding=False`; with `return_dict`, a dict that also holds the `attention_mask`. Extra keyword
        arguments become template variables.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this processor has no chat template: pass chat_template= or add chat_template.jinja")
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError("conversation must be a non-empty list of messages, or a list of such lists")
        batched = isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        variables = {
            "tools": None,
            "documents": None,
            **self.tokenizer.special_tokens_map,
            **template_kwargs,
            "add_generation_prompt": add_generation_prompt,
        }
        texts = [
            _compile(template).render(messages=[_checked_message(m) for m in messages], **variables)
            for messages in conversations
        ]
        if not tokenize:
            return texts if batched else texts[0]
        # Like the reference, add BOS only when the template did not write one itself.
        bos = self.tokenizer.bos_token
        add_bos = bos is None or not texts[0].startswith(bos)
        encoded = self.tokenizer(texts, padding=padding, return_tensors=return_tensors, add_special_tokens=add_bos)
        return encoded if return_dict else encoded["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs):
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)


class AutoProcessor:
    """Name-compatible entry point: `AutoProcessor.from_pretrained(...)` gives a `DiffusionGemmaProcessor`."""

    @staticmethod
    def from_pretrained(path_or_repo_id: str | Path) -> DiffusionGemmaProcessor:
        return DiffusionGemmaProcessor.from_pretrained(path_or_repo_id)
