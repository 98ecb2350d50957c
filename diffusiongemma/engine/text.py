"""From committed tokens to text: the end-of-turn cut and incremental detokenization, shared by the
server, the CLI and the streamers."""

from __future__ import annotations

import re

# Byte-fallback tokens, which the tokenizer joins with their neighbours into characters.
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def eos_ids(eos_token_id) -> set[int]:
    """A generation config's `eos_token_id` (an id, a list of ids or None) as a set."""
    if eos_token_id is None:
        return set()
    return set(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else {eos_token_id}


def cut_at_end(ids: list[int], eos: set[int]) -> list[int]:
    """The tokens up to and including the first end-of-sequence token: what follows it in its canvas is
    not part of the answer."""
    end = next((i for i, token in enumerate(ids) if token in eos), None)
    return ids if end is None else ids[:end + 1]


class IncrementalDetokenizer:
    """Text of a growing list of tokens, and how much of it later tokens can no longer change.

    The tokenizer reads a run of byte tokens (and the special tokens it skips) as one piece, so text that
    ends in one may still change when the next tokens come; `settled()` leaves it out until it is followed
    by an ordinary token."""

    def __init__(self, tokenizer, **decode_kwargs):
        self.tokenizer = tokenizer
        self.decode_kwargs = decode_kwargs
        self.special_ids = set(getattr(tokenizer, "all_special_ids", ()))
        self.tokens: list[int] = []

    def add(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def clear(self) -> None:
        self.tokens = []

    def text(self, limit: int | None = None) -> str:
        """The text of all tokens, or of the first `limit`."""
        tokens = self.tokens if limit is None else self.tokens[:limit]
        return self.tokenizer.decode(tokens, **self.decode_kwargs)

    def settled(self, limit: int | None = None) -> str:
        """The text that later tokens cannot change, of all tokens or of the first `limit`."""
        tokens = self.tokens if limit is None else self.tokens[:limit]
        end = len(tokens)
        while end and self._open_ended(tokens[end - 1]):
            end -= 1
        return self.tokenizer.decode(tokens[:end], **self.decode_kwargs)

    def _open_ended(self, token: int) -> bool:
        piece = self.tokenizer.convert_ids_to_tokens(token) or ""
        return token in self.special_ids or BYTE_TOKEN.fullmatch(piece) is not None
