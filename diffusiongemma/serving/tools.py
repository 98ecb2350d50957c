"""Tool calls: the OpenAI request fields that describe tools, and Gemma 4's calls in an answer.

Gemma 4 writes a call as `<|tool_call>call:NAME{ARGUMENTS}<tool_call|>`, its arguments in its own notation:
keys bare, strings between `<|"|>` marks, numbers, `true`, `false` and `null` bare, and `{...}` and `[...]`
nested. An answer's calls become OpenAI `tool_calls` with the arguments as JSON; the rest of its text
stays its content. A call that does not parse stays in the content as written.
"""

from __future__ import annotations

import json
import re
import uuid

CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
STRING_MARK = '<|"|>'
_CALL = re.compile(re.escape(CALL_OPEN) + r"call:([A-Za-z_][\w.\-]*)\{(.*?)\}" + re.escape(CALL_CLOSE), re.S)
_BARE = re.compile(r"[^\s,:{}\[\]]+")


class _Notation:
    """A reader of Gemma's argument notation, one value at a time; raises ValueError where it is not."""

    def __init__(self, text: str):
        self.text, self.at = text, 0

    def _skip(self) -> None:
        while self.at < len(self.text) and self.text[self.at].isspace():
            self.at += 1

    def _take(self, literal: str) -> bool:
        self._skip()
        if self.text.startswith(literal, self.at):
            self.at += len(literal)
            return True
        return False

    def _string(self) -> str:
        end = self.text.find(STRING_MARK, self.at)
        if end < 0:
            raise ValueError("an unclosed string")
        value, self.at = self.text[self.at:end], end + len(STRING_MARK)
        return value

    def _bare(self) -> str:
        self._skip()
        match = _BARE.match(self.text, self.at)
        if match is None:
            raise ValueError(f"nothing readable at {self.at}")
        self.at = match.end()
        return match.group()

    def members(self, closing: str) -> dict:
        """`key:value` pairs up to `closing` (or the end of the text, for the call's outer braces)."""
        members = {}
        while not (self._take(closing) if closing else self._end()):
            if members and not self._take(","):
                raise ValueError("members must be separated by commas")
            key = self._string() if self._take(STRING_MARK) else self._bare()
            if not self._take(":"):
                raise ValueError(f"no value for {key!r}")
            members[key] = self.value()
        return members

    def _end(self) -> bool:
        self._skip()
        return self.at >= len(self.text)

    def value(self):
        if self._take(STRING_MARK):
            return self._string()
        if self._take("{"):
            return self.members("}")
        if self._take("["):
            items = []
            while not self._take("]"):
                if items and not self._take(","):
                    raise ValueError("items must be separated by commas")
                items.append(self.value())
            return items
        word = self._bare()
        if word in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[word]
        try:
            return int(word)
        except ValueError:
            return float(word)


def parse_calls(text: str, special_tokens: list[str]) -> tuple[str, list[dict]]:
    """(content, OpenAI tool calls) of an answer's text written with its special tokens; the content
    leaves out the calls and every special token."""
    calls, kept, last = [], [], 0
    for match in _CALL.finditer(text):
        try:
            arguments = _Notation(match.group(2)).members("")
        except ValueError:
            continue
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": match.group(1), "arguments": json.dumps(arguments)}})
    content = "".join(kept) + text[last:]
    for token in sorted(special_tokens, key=len, reverse=True):
        content = content.replace(token, "")
    return content.strip(), calls


def call_prefix(name: str) -> str:
    """How an answer that calls `name` starts: the model goes on with the arguments."""
    return f"{CALL_OPEN}call:{name}{{"
