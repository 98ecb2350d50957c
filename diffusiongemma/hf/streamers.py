"""Streaming generated text while a block-diffusion generation runs.

Protocol, as the generation loop drives it: `put(prompt_ids)` once, then for each canvas one
`put_draft(value=argmax_canvas)` per denoising step and `put(canvas_ids)` when the canvas is committed,
and `end()` once. Ids arrive as tensors of shape [1, length] (or [length]); batches are refused.
"""

import sys
import time
from queue import Empty, Queue
from typing import NamedTuple

from ..engine.text import IncrementalDetokenizer

SAVE_CURSOR = "\0337"
RESTORE_CURSOR_AND_CLEAR = "\0338\033[J"
YELLOW, RESET = "\033[33m", "\033[0m"

# CJK ideograph blocks: text in these scripts has no spaces, so every character is a printable unit.
_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)


def _is_cjk(char: str) -> bool:
    return any(low <= ord(char) <= high for low, high in _CJK_RANGES)


def _single_row(value, streamer: str) -> list[int]:
    if len(value.shape) > 1:
        if value.shape[0] != 1:
            raise ValueError(f"{streamer} streams one sequence, got a batch of {value.shape[0]}")
        value = value[0]
    return value.tolist()


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class BaseStreamer:
    """What a generation loop calls; `put_draft` is optional and only called when a streamer has it."""

    def put(self, value) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


class TextStreamer(BaseStreamer):
    """Prints committed text to stdout as whole words form.

    Text that the next tokens could still change (a word cut at a canvas edge, a half-decoded character)
    is held back until a space, a newline, a CJK character or `end()` settles it.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, **decode_kwargs):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        # The tokens of the current line: decoding them whole keeps characters split across tokens intact.
        self.pending = IncrementalDetokenizer(tokenizer, **decode_kwargs)
        self.printed_chars = 0
        self.expecting_prompt = True

    def put(self, value) -> None:
        ids = _single_row(value, type(self).__name__)
        if self.skip_prompt and self.expecting_prompt:
            self.expecting_prompt = False
            return
        self.pending.add(ids)
        text = self.pending.text()
        if text.endswith("\n"):
            printable = text[self.printed_chars :]
            self.pending.clear()
            self.printed_chars = 0
        elif text and _is_cjk(text[-1]):
            printable = text[self.printed_chars :]
            self.printed_chars += len(printable)
        else:
            printable = text[self.printed_chars : text.rfind(" ") + 1]
            self.printed_chars += len(printable)
        self.on_finalized_text(printable)

    def end(self) -> None:
        printable = ""
        if self.pending.tokens:
            printable = self.pending.text()[self.printed_chars :]
            self.pending.clear()
            self.printed_chars = 0
        self.expecting_prompt = True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        _write(text + "\n" if stream_end else text)


class TextDiffusionStreamer(TextStreamer):
    """`TextStreamer` that also shows each denoising step's draft, in yellow, after the committed text.

    Each draft overwrites the previous one in place (ANSI save/restore cursor), and committed text
    replaces the draft. Terminals that ignore those codes (some multiplexers) leave drafts on screen.
    `sleep_time` pauses after every draft so the denoising can be watched. Drafts are shown only while
    stdout is a terminal: into a pipe or a file this streamer writes what `TextStreamer` writes, not
    escape codes and text that is about to be erased.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, sleep_time: float | None = None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.sleep_time = sleep_time
        self._has_draft = False

    def put_draft(self, value, **kwargs) -> None:
        ids = _single_row(value, type(self).__name__)
        if not sys.stdout.isatty():
            return
        self._clear_draft()
        text = self.tokenizer.decode(ids, **self.decode_kwargs)
        _write(SAVE_CURSOR)
        _write(f"{YELLOW}{text}{RESET}")
        self._has_draft = True
        if self.sleep_time is not None:
            time.sleep(self.sleep_time)

    def put(self, value) -> None:
        self._clear_draft()
        super().put(value)

    def end(self) -> None:
        self._clear_draft()
        super().end()

    def _clear_draft(self) -> None:
        if self._has_draft:
            _write(RESTORE_CURSOR_AND_CLEAR)
            self._has_draft = False


_END = object()


class TextIteratorStreamer(TextStreamer):
    """Committed text chunks, for another thread to read with a `for` loop that ends after `end()`.

    With a `timeout` (seconds), waiting longer than that for the next chunk raises `TimeoutError`.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.timeout = timeout
        self.queue: Queue = Queue()

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.queue.put(text)
        if stream_end:
            self.queue.put(_END)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            item = self.queue.get(timeout=self.timeout)
        except Empty:
            raise TimeoutError(f"no streamed text arrived within {self.timeout} s") from None
        if item is _END:
            raise StopIteration
        return item


class StreamEvent(NamedTuple):
    """`kind` is "draft" (the whole current draft, replacing the last one) or "text" (newly committed text)."""

    kind: str
    text: str


class DiffusionIteratorStreamer(TextIteratorStreamer):
    """Drafts and committed text as `StreamEvent`s, in order, for another thread to read.

    A draft event's text starts with any committed text still held back at a word edge, so showing the
    committed text followed by the latest draft never leaves a gap. Empty text is not sent.
    """

    def put_draft(self, value, **kwargs) -> None:
        ids = self.pending.tokens + _single_row(value, type(self).__name__)
        self.queue.put(StreamEvent("draft", self.tokenizer.decode(ids, **self.decode_kwargs)[self.printed_chars :]))

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.queue.put(StreamEvent("text", text))
        if stream_end:
            self.queue.put(_END)


class StepCounter:
    """Counts the denoising steps of each canvas (one draft per step) and passes every call on to `inner`."""

    def __init__(self, inner=None):
        self.inner = inner
        self.steps: list[int] = []
        self._drafts = 0
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.steps.append(self._drafts)
            self._drafts = 0
        self._prompt_seen = True
        if self.inner is not None:
            self.inner.put(value)

    def put_draft(self, value, **kwargs) -> None:
        self._drafts += 1
        if hasattr(self.inner, "put_draft"):
            self.inner.put_draft(value, **kwargs)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()
