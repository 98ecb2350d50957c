"""Tool calling in `serve`: Gemma 4's calls read from an answer, the OpenAI fields that describe tools, and
earlier calls and their results rendered back into the prompt."""

import copy
import json

import httpx
import openai
import pytest
from test_server import FAST, MODEL, client, running

from diffusiongemma.serving import scheduler as engine
from diffusiongemma.serving.server import create_app
from diffusiongemma.serving.tools import call_prefix, parse_calls

S = '<|"|>'
# A chat template that writes tools, calls and their results the way Gemma 4's does, in short.
TOOL_TEMPLATE = (
    "{% if tools %}<start_of_turn>system\n{% for tool in tools %}<|tool>declaration:{{ tool.function.name }}<tool|>"
    "{% endfor %}<end_of_turn>\n{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ m.role }}\n"
    "{% for c in m.tool_calls or [] %}<|tool_call>call:{{ c.function.name }}{{ '{' }}"
    "{% for k, v in c.function.arguments.items() %}{{ k }}:{{ v }}{% endfor %}{{ '}' }}<tool_call|>{% endfor %}"
    "{% if m.role == 'tool' %}<|tool_response>{{ m.content }}<tool_response|>{% else %}{{ m.content or '' }}"
    "{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]


def test_calls_are_read_from_gemmas_notation():
    text = (f"Let me look.<|tool_call>call:get_weather{{city:{S}Paris{S},days:3,units:{{metric:true}},"
            f"hours:[6,{S}noon{S},18.5],note:null}}<tool_call|><|tool_call>call:get_time{{}}<tool_call|><end_of_turn>")
    content, calls = parse_calls(text, ["<end_of_turn>"])
    assert content == "Let me look."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 3, "units": {"metric": True},
                                                             "hours": [6, "noon", 18.5], "note": None}
    assert json.loads(calls[1]["function"]["arguments"]) == {}
    assert calls[0]["type"] == "function" and calls[0]["id"] != calls[1]["id"]
    # A call that does not parse stays in the content as written.
    broken = "<|tool_call>call:f{x:}<tool_call|>"
    assert parse_calls(broken, []) == (broken, [])


@pytest.fixture(scope="module")
def tool_server(tiny):
    model, processor = tiny
    processor = copy.copy(processor)
    processor.chat_template = TOOL_TEMPLATE
    app = create_app(model, processor, MODEL)
    with running(app) as url:
        yield url, processor


def answering(monkeypatch, raw: str):
    """Every answer's text with special tokens becomes `raw`: a random model writes no calls of its own."""
    commit = engine._Running._commit

    def with_raw(self):
        outcome = commit(self)
        if outcome is not None and outcome.raw is not None:
            outcome.raw = raw
        return outcome

    monkeypatch.setattr(engine._Running, "_commit", with_raw)


def test_tool_calls_come_back_whole_and_streamed(tool_server, monkeypatch):
    url, _ = tool_server
    api = client(url)
    answering(monkeypatch, f"Checking.<|tool_call>call:get_weather{{city:{S}Paris{S}}}<tool_call|><end_of_turn>")
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "weather in Paris?"}], tools=TOOLS, max_tokens=16,
               seed=1, extra_body=FAST)
    answer = api.chat.completions.create(**ask).choices[0]
    assert answer.finish_reason == "tool_calls" and answer.message.content == "Checking."
    (call,) = answer.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    streamed, reasons = [], []
    for chunk in api.chat.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            streamed.extend(choice.delta.tool_calls or [])
            reasons.append(choice.finish_reason)
    assert [c.function.name for c in streamed] == ["get_weather"] and reasons[-1] == "tool_calls"
    # With tool_choice "none" nothing is read as a call.
    plain = api.chat.completions.create(**ask, tool_choice="none").choices[0]
    assert plain.finish_reason != "tool_calls" and not plain.message.tool_calls


def test_a_named_tool_choice_starts_the_answer_with_its_call(tool_server, monkeypatch):
    url, processor = tool_server
    api = client(url)
    answering(monkeypatch, f"city:{S}Rome{S}}}<tool_call|><end_of_turn>")
    messages = [{"role": "user", "content": "weather?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    answer = api.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice=named,
                                         max_tokens=16, extra_body=FAST).choices[0]
    assert json.loads(answer.message.tool_calls[0].function.arguments) == {"city": "Rome"}
    shown = httpx.post(f"{url}/tokenize", json={"messages": messages, "tools": TOOLS}).json()
    text = processor.decode(shown["tokens"])
    assert "<|tool>declaration:get_weather<tool|>" in text and not text.endswith(call_prefix("get_weather"))
    with pytest.raises(openai.BadRequestError, match="required"):
        api.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        api.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                    tool_choice={"type": "function", "function": {"name": "nowhere"}})


def test_earlier_calls_and_their_results_reach_the_prompt(tool_server):
    url, processor = tool_server
    api = client(url)
    messages = [{"role": "user", "content": "weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "cold"}]
    shown = httpx.post(f"{url}/tokenize", json={"messages": messages, "tools": TOOLS}).json()
    text = processor.decode(shown["tokens"])
    assert "<|tool_call>call:get_weather{city:Oslo}<tool_call|>" in text
    assert "<|tool_response>cold<tool_response|>" in text
    answer = api.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=8, extra_body=FAST)
    assert answer.choices[0].finish_reason in ("stop", "length")
    # Calls belong to the assistant's messages, call ids to the tools'.
    for bad in ({"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
                {"role": "user", "content": "x", "tool_call_id": "call_1"}):
        with pytest.raises(openai.BadRequestError):
            api.chat.completions.create(model=MODEL, messages=[bad], max_tokens=8, extra_body=FAST)
