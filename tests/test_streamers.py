"""Streamers: byte-identical stdout to the reference's for the same calls, and the event iterator."""

import contextlib
import io
import re
import threading

import pytest
import torch
import transformers
from transformers.generation import streamers as reference

from diffusiongemma.hf import streamers
from diffusiongemma.hf.chat_fixture import write_tokenizer
from diffusiongemma.hf.streamers import (
    DiffusionIteratorStreamer,
    StreamEvent,
    TextDiffusionStreamer,
    TextIteratorStreamer,
    TextStreamer,
)
from diffusiongemma.hf.tokenizer import DiffusionGemmaTokenizer

CANVAS = 16
RESPONSE = "The sky looks blue because air scatters short light, 空气散射 more.\nCafé 😀 and sunsets 🌅 turn red.\n\nThat is all: 日本語 ok"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder, 512)
    return DiffusionGemmaTokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)


def _generation_calls(tokenizer) -> list[tuple[str, torch.Tensor | None]]:
    """The calls a block-diffusion generate makes: prompt, then three drafts and a commit per canvas, then end.

    The response is cut into canvases wherever the token count says, so words and multi-byte characters
    straddle canvas edges; the last canvas ends with EOS and padding.
    """
    prompt = torch.tensor([tokenizer.encode("<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n")])
    ids = tokenizer.encode(RESPONSE, add_special_tokens=False) + [tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * (-len(ids) % CANVAS)
    generator = torch.Generator().manual_seed(0)
    calls = [("put", prompt)]
    for start in range(0, len(ids), CANVAS):
        final = torch.tensor(ids[start : start + CANVAS])
        noisy = final[torch.randperm(CANVAS, generator=generator)]
        half = torch.where(torch.arange(CANVAS) < CANVAS // 2, final, noisy)
        calls += [("put_draft", draft[None]) for draft in (noisy, half, final)] + [("put", final[None])]
    return calls + [("end", None)]


class Terminal(io.StringIO):
    """stdout as a terminal: where the diffusion streamer shows its drafts."""

    def isatty(self) -> bool:
        return True


def _run(streamer, calls, terminal: bool = True) -> str:
    out = Terminal() if terminal else io.StringIO()
    with contextlib.redirect_stdout(out):
        for method, value in calls:
            if method == "put_draft":
                streamer.put_draft(value=value)
            elif method == "put":
                streamer.put(value)
            else:
                streamer.end()
    return out.getvalue()


def _screen(output: str) -> str:
    """What a terminal shows after `output`: save/restore cursor and clear-to-end applied, colours dropped."""
    screen, saved = "", 0
    for piece in re.split(r"(\x1b7|\x1b8\x1b\[J|\x1b\[\d+m)", output):
        if piece == "\x1b7":
            saved = len(screen)
        elif piece == "\x1b8\x1b[J":
            screen = screen[:saved]
        elif not re.fullmatch(r"\x1b\[\d+m", piece):
            screen += piece
    return screen


@pytest.mark.parametrize("skip_prompt", [False, True])
@pytest.mark.parametrize("decode_kwargs", [{}, {"skip_special_tokens": True}])
def test_diffusion_streamer_prints_the_reference_bytes(tokenizers, skip_prompt, decode_kwargs):
    ours, ref = tokenizers
    got = _run(TextDiffusionStreamer(ours, skip_prompt=skip_prompt, **decode_kwargs), _generation_calls(ours))
    expected = _run(reference.TextDiffusionStreamer(ref, skip_prompt=skip_prompt, **decode_kwargs), _generation_calls(ours))
    assert got == expected
    assert "\x1b7\x1b[33m" in got and "\x1b8\x1b[J" in got


@pytest.mark.parametrize("skip_prompt", [False, True])
def test_text_streamer_prints_the_reference_bytes(tokenizers, skip_prompt):
    ours, ref = tokenizers
    commits = [call for call in _generation_calls(ours) if call[0] != "put_draft"]
    kwargs = {"skip_special_tokens": True}
    assert _run(TextStreamer(ours, skip_prompt, **kwargs), commits) == _run(
        reference.TextStreamer(ref, skip_prompt, **kwargs), commits
    )
    iterator, ref_iterator = TextIteratorStreamer(ours, skip_prompt), reference.TextIteratorStreamer(ref, skip_prompt)
    _run(iterator, commits), _run(ref_iterator, commits)
    assert list(iterator) == list(ref_iterator)


def test_drafts_are_erased_and_committed_text_stays(tokenizers):
    ours, _ = tokenizers
    calls = _generation_calls(ours)
    output = _run(TextDiffusionStreamer(ours, skip_prompt=True, skip_special_tokens=True), calls)
    committed = ours.decode(torch.cat([value[0] for method, value in calls[1:] if method == "put"]), skip_special_tokens=True)
    assert _screen(output) == committed + "\n"
    assert output.count("\x1b7") == output.count("\x1b8\x1b[J") == sum(method == "put_draft" for method, _ in calls)
    # The draft on screen when a canvas commits gives way to that canvas's words, up to the last whole one.
    streamer = TextDiffusionStreamer(ours, skip_prompt=True, skip_special_tokens=True)
    drafting = _run(streamer, calls[:2])
    assert _screen(drafting) == ours.decode(calls[1][1], skip_special_tokens=True)[0]
    first_canvas = ours.decode(calls[4][1][0])
    assert _screen(drafting + _run(streamer, calls[2:5])) == first_canvas[: first_canvas.rfind(" ") + 1]


@pytest.mark.parametrize("skip_prompt", [False, True])
def test_diffusion_streamer_writes_no_drafts_into_a_pipe(tokenizers, monkeypatch, skip_prompt):
    ours, _ = tokenizers
    pauses = []
    monkeypatch.setattr(streamers.time, "sleep", pauses.append)
    calls = _generation_calls(ours)
    kwargs = {"skip_prompt": skip_prompt, "skip_special_tokens": True}
    piped = _run(TextDiffusionStreamer(ours, sleep_time=0.25, **kwargs), calls, terminal=False)
    commits = [call for call in calls if call[0] != "put_draft"]
    assert piped == _run(TextStreamer(ours, **kwargs), commits, terminal=False)
    assert "\x1b" not in piped and pauses == [], "nothing to watch, so no pauses either"


def test_sleep_time_pauses_after_each_draft(tokenizers, monkeypatch):
    ours, _ = tokenizers
    pauses = []
    monkeypatch.setattr(streamers.time, "sleep", pauses.append)
    calls = _generation_calls(ours)
    _run(TextDiffusionStreamer(ours, sleep_time=0.25), calls)
    assert pauses == [0.25] * sum(method == "put_draft" for method, _ in calls)


def test_iterator_yields_drafts_and_text_in_order_from_another_thread(tokenizers):
    ours, _ = tokenizers
    calls = _generation_calls(ours)
    streamer = DiffusionIteratorStreamer(ours, skip_prompt=True, timeout=10, skip_special_tokens=True)
    worker = threading.Thread(target=_run, args=(streamer, calls))
    worker.start()
    events = list(streamer)
    worker.join()
    assert all(isinstance(event, StreamEvent) and event.text for event in events)
    kinds = [event.kind for event in events]
    assert kinds[:3] == ["draft"] * 3 and kinds.count("draft") == sum(method == "put_draft" for method, _ in calls)
    committed = ours.decode(torch.cat([value[0] for method, value in calls[1:] if method == "put"]), skip_special_tokens=True)
    assert "".join(event.text for event in events if event.kind == "text") == committed
    # Committed text so far followed by a draft reads as the whole text, even where a word straddles the edge.
    committed_ids, texts, drafts = [], [], iter(event for event in events)
    for method, value in calls[1:-1]:
        if method == "put":
            committed_ids += value[0].tolist()
            continue
        while (event := next(drafts)).kind == "text":
            texts.append(event.text)
        assert "".join(texts) + event.text == ours.decode(committed_ids + value[0].tolist(), skip_special_tokens=True)


def test_iterator_timeout(tokenizers):
    ours, _ = tokenizers
    for streamer in (DiffusionIteratorStreamer(ours, timeout=0.01), TextIteratorStreamer(ours, timeout=0.01)):
        with pytest.raises(TimeoutError, match="within 0.01 s"):
            next(streamer)


@pytest.mark.parametrize("cls", [TextStreamer, TextDiffusionStreamer, TextIteratorStreamer, DiffusionIteratorStreamer])
def test_batches_are_refused(tokenizers, cls):
    ours, _ = tokenizers
    batch = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=f"{cls.__name__} streams one sequence, got a batch of 2"):
        cls(ours).put(batch)
    if hasattr(cls, "put_draft"):
        with pytest.raises(ValueError, match="batch of 2"):
            cls(ours).put_draft(value=batch)
