"""The text tokenizer: a `tokenizers` pipeline read from `tokenizer.json`, plus the checkpoint's special tokens."""

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

from .loading import resolve_folder

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value) -> str | None:
    # Configs store a special token either as its text or as a serialized AddedToken; other `*_token`
    # keys (`add_bos_token`, ...) are settings, not tokens.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_special_tokens(folder: Path) -> tuple[dict[str, str], list[str]]:
    """Named special tokens (`*_token` keys, `extra_special_tokens` dicts) and unnamed ones (token lists).

    tokenizer_config.json wins over the older special_tokens_map.json.
    """
    named, unnamed = {}, {}
    for source in (_read_json(folder / "special_tokens_map.json"), _read_json(folder / "tokenizer_config.json")):
        extra = source.get("extra_special_tokens") or source.get("additional_special_tokens") or {}
        if isinstance(extra, list):
            unnamed.update(dict.fromkeys(filter(None, map(_token_text, extra))))
            extra = {}
        for name, value in {**source, **extra}.items():
            if name.endswith("_token") and _token_text(value) is not None:
                named[name] = _token_text(value)
    return named, list(unnamed)


# Word-piece decoding leaves a space before punctuation and English contractions; the clean-up joins them.
_DETACHED = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")


def _clean_up_tokenization(text: str) -> str:
    for detached in _DETACHED:
        text = text.replace(detached, detached.strip(" "))
    return text


class DiffusionGemmaTokenizer:
    """Encodes and decodes text like the reference's tokenizer for the same files.

    Every named special token is an attribute with its id beside it (`eos_token`, `eos_token_id`), and so is
    every model-specific one from `extra_special_tokens` (`boi_token`, `boi_token_id`, `image_token`, ...).
    Batches are padded on the left, the side block-diffusion generation appends to.
    """

    def __init__(
        self,
        backend: Tokenizer,
        special_tokens: dict[str, str],
        extra_special_tokens: tuple[str, ...] | list[str] = (),
        clean_up_tokenization_spaces: bool = False,
    ):
        self.backend = backend
        # The reference treats every configured special token as special, whatever tokenizer.json says, so
        # `skip_special_tokens` drops them all.
        all_special = [*special_tokens.values(), *extra_special_tokens]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in all_special])
        self.all_special_ids = [backend.token_to_id(token) for token in all_special]
        self.special_tokens_map = dict(special_tokens)
        for name in (*NAMED_SPECIAL_TOKENS, *special_tokens):
            token = special_tokens.get(name)
            setattr(self, name, token)
            setattr(self, f"{name}_id", None if token is None else backend.token_to_id(token))
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        # The reference never applies that clean-up to BPE models, where it would delete real spaces.
        self._can_clean_up = type(backend.model).__name__ != "BPE"

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path) -> "DiffusionGemmaTokenizer":
        folder = Path(resolve_folder(path_or_repo_id, TOKENIZER_FILES))
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"No tokenizer.json in '{folder}': a DiffusionGemma tokenizer needs one")
        special_tokens, extra_special_tokens = _read_special_tokens(folder)
        clean_up = bool(_read_json(folder / "tokenizer_config.json").get("clean_up_tokenization_spaces", False))
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return cls(backend, special_tokens, extra_special_tokens, clean_up)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None):
        """Text of one sequence of ids; a batch (2-D tensor or list of lists) gives a list of texts."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(row, skip_special_tokens, clean_up_tokenization_spaces) for row in ids]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return _clean_up_tokenization(text) if clean_up_tokenization_spaces and self._can_clean_up else text

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        texts = self.decode(sequences, skip_special_tokens, **kwargs)
        return [texts] if isinstance(texts, str) else texts

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            token_id = self.backend.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        skipped = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend.id_to_token(i) for i in ids if i not in skipped]

    def __call__(
        self,
        text: str | list[str],
        padding: bool | str = False,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> dict:
        """`input_ids` and `attention_mask` for one text (flat lists) or a batch (one row each).

        `padding=True` or `"longest"` left-pads a batch with `pad_token_id`; `return_tensors="pt"` gives
        [batch, length] tensors, a single text included.
        """
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if padding not in (True, False, "longest", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest' or 'do_not_pad', got {padding!r}")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a non-empty list of strings")
        rows = [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        masks = [[1] * len(row) for row in rows]
        if padding in (True, "longest"):
            rows, masks = self._pad_left(rows)
        if return_tensors == "pt":
            if len({len(row) for row in rows}) > 1:
                raise ValueError("texts of different lengths need padding=True to become one tensor")
            return {"input_ids": torch.tensor(rows, dtype=torch.long), "attention_mask": torch.tensor(masks)}
        if isinstance(text, str):
            return {"input_ids": rows[0], "attention_mask": masks[0]}
        return {"input_ids": rows, "attention_mask": masks}

    def _pad_left(self, rows: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
        """Rows left-padded to the longest, with their attention masks."""
        longest = max(len(row) for row in rows)
        if self.pad_token_id is None and any(len(row) < longest for row in rows):
            raise ValueError("padding needs a pad token, and this tokenizer has none")
        padded = [[self.pad_token_id] * (longest - len(row)) + row for row in rows]
        masks = [[0] * (longest - len(row)) + [1] * len(row) for row in rows]
        return padded, masks
