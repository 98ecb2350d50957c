"""The request fields of the server's endpoints: each is honoured, accepted where it changes nothing, or
refused with an OpenAI-style 400 that names it, so that nothing a client sends is dropped without a word.

The full list, per endpoint, is in `server.py`'s docstring; the tables here are what enforces it.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
import urllib.parse

from .scheduler import TUNABLE

MAX_STOP_STRINGS = 4
# The sampling filters a request may set (`sampler.SamplingFilters`), and where its answer may end.
FILTERS = ("top_k", "top_p", "min_p")
ENDINGS = ("stop_token_ids", "ignore_eos", "min_tokens")
PENALTIES = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}
# Generation parameters whose request field has another name.
API_NAMES = {"max_new_tokens": "max_tokens", "sampler_config": "entropy_bound"}


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


NUMBER = (is_number, "a number")
INTEGER = (is_int, "an integer")
BOOLEAN = (lambda value: isinstance(value, bool), "a boolean")
STRING = (lambda value: isinstance(value, str), "a string")
LIST = (lambda value: isinstance(value, list), "a list")
OBJECT = (lambda value: isinstance(value, dict), "an object")
CHOICE = (lambda value: isinstance(value, (str, dict)), "a string or an object")

_COMMON = ("model", "max_tokens", "max_completion_tokens", "temperature", "seed", "stop", "stream", "stream_options",
           "response_format", "include_stop_str_in_output", "n", *FILTERS, *ENDINGS, *PENALTIES, *TUNABLE)
# What each endpoint acts on; the code that reads a field checks its value.
HONOURED = {
    "chat": {*_COMMON, "messages", "chat_template", "add_generation_prompt", "continue_final_message", "logprobs",
             "top_logprobs", "tools", "tool_choice"},
    "completions": {*_COMMON, "prompt", "logprobs"},
    "tokenize": {"model", "prompt", "add_special_tokens", "messages", "tools", "chat_template", "add_generation_prompt",
                 "continue_final_message"},
    "detokenize": {"model", "tokens"},
}

# Fields of features the engine does not have, accepted at the values that leave them off (clients and
# libraries send some of these by default). Any other value is refused.
_SAMPLING_NO_OPS = {
    "logit_bias": (OBJECT, ({},)),
}
NO_OPS = {
    "chat": {**_SAMPLING_NO_OPS,
             "functions": (LIST, ([],)),
             # The legacy names of `tools` and `tool_choice`, at the values that leave them off.
             "function_call": (CHOICE, ("none", "auto")),
             "parallel_tool_calls": (BOOLEAN, (True, False)),
             "modalities": (LIST, (["text"],)),
             "store": (BOOLEAN, (False,)),
             "service_tier": (STRING, ("auto", "default"))},
    "completions": {**_SAMPLING_NO_OPS,
                    "best_of": (INTEGER, (1,)),
                    "echo": (BOOLEAN, (False,)),
                    "suffix": (STRING, ("",))},
    "tokenize": {},
    "detokenize": {},
}
# Fields that say who asks or ask for bookkeeping this server does not keep; they never change the answer.
IGNORED = {"user": STRING, "metadata": OBJECT, "safety_identifier": STRING, "prompt_cache_key": STRING}
IGNORED_BY = {"chat": IGNORED, "completions": IGNORED, "tokenize": {}, "detokenize": {}}
STREAM_OPTIONS = ("include_usage", "include_drafts", "include_obfuscation")


def check_values(body: dict) -> None:
    """Refuses, naming the top-level field, text that is not Unicode (a lone surrogate, which JSON's
    escapes can carry and the tokenizer cannot read) and numbers too large for a float (JSON reads
    1e400 as infinity)."""
    pending = list(body.items())
    while pending:
        name, value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"`{name}` holds a lone surrogate (\\ud800 to \\udfff), which is not text",
                               param=name) from None
        elif isinstance(value, float) and not math.isfinite(value):
            raise ApiError(400, f"`{name}` holds a number too large for a float", param=name)
        elif isinstance(value, dict):
            pending.extend((name, item) for item in value.values())
            pending.extend((name, key) for key in value)
        elif isinstance(value, list):
            pending.extend((name, item) for item in value)


def check_fields(body: dict, endpoint: str) -> None:
    """Refuses fields the endpoint neither honours nor accepts, and no-op fields at a value that would do
    something. A null counts as left out, as in OpenAI's API, except for a field nobody knows."""
    honoured, no_ops, ignored = HONOURED[endpoint], NO_OPS[endpoint], IGNORED_BY[endpoint]
    for name, value in body.items():
        if name in honoured:
            continue
        if name in ignored:
            valid, kind = ignored[name]
            if value is not None and not valid(value):
                raise ApiError(400, f"`{name}` must be {kind}, got {value!r}", param=name)
            continue
        if name not in no_ops:
            raise ApiError(400, f"`{name}` is not a field this server knows or supports", param=name)
        (valid, kind), defaults = no_ops[name]
        if value is None:
            continue
        if not valid(value):
            raise ApiError(400, f"`{name}` must be {kind}, got {value!r}", param=name)
        if value not in defaults:
            accepted = " or ".join(repr(default) for default in defaults)
            raise ApiError(400, f"`{name}` = {value!r} is not supported by this server (it accepts only {accepted}, "
                                "which changes nothing)", param=name)


def positive_int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is not None and (not is_int(value) or value < 1):
        raise ApiError(400, f"`{name}` must be a positive integer, got {value!r}", param=name)
    return value


def flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"`{name}` must be a boolean, got {value!r}", param=name)
    return value


def max_tokens(body: dict) -> int | None:
    """`max_completion_tokens` (OpenAI's newer name) or `max_tokens`; both may be given if they agree."""
    newer, older = positive_int(body, "max_completion_tokens"), positive_int(body, "max_tokens")
    if newer is not None and older is not None and newer != older:
        raise ApiError(400, f"`max_tokens` ({older}) and `max_completion_tokens` ({newer}) disagree; send one",
                       param="max_tokens")
    return older if newer is None else newer


def stop_strings(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"`stop` must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
                       param="stop")
    return tuple(stops)


def stream_options(body: dict) -> tuple[bool, bool, bool]:
    """(stream, include_usage, include_drafts)."""
    stream, options = flag(body, "stream", False), body.get("stream_options")
    if options is None:
        return stream, False, False
    if not isinstance(options, dict):
        raise ApiError(400, "`stream_options` must be an object", param="stream_options")
    if not stream:
        raise ApiError(400, "`stream_options` is only allowed with `stream: true`", param="stream_options")
    unknown = sorted(set(options) - set(STREAM_OPTIONS))
    if unknown:
        raise ApiError(400, f"`stream_options.{unknown[0]}` is not an option this server knows",
                       param="stream_options")
    flags = {}
    for name in STREAM_OPTIONS:
        value = options.get(name)
        if value is not None and not isinstance(value, bool):
            raise ApiError(400, f"`stream_options.{name}` must be a boolean, got {value!r}", param="stream_options")
        flags[name] = bool(value)
    if flags["include_obfuscation"]:
        # This server pads nothing; saying yes would pretend it does.
        raise ApiError(400, "`stream_options.include_obfuscation` is not supported by this server",
                       param="stream_options")
    return stream, flags["include_usage"], flags["include_drafts"]


def response_format(body: dict) -> None:
    value = body.get("response_format")
    if value is not None and value != {"type": "text"}:
        raise ApiError(400, "only `response_format` {\"type\": \"text\"} is supported: this server cannot "
                            "constrain the answer to JSON", param="response_format")


# A message's own fields; the others, when set, would be dropped by the chat template.
MESSAGE_FIELDS = ("role", "content", "tool_calls", "tool_call_id")


def _image_url(part: dict, allowed_media_domains: frozenset[str]) -> None:
    """Refuses an image part whose source the server may not read: a `data:` URL always may, an http(s)
    URL only on a host the server was started to allow, and nothing else (a file on the server, say)."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else None
    if not isinstance(url, str) or set(image) - {"url", "detail"}:
        raise ApiError(400, "an image part must look like {'type': 'image_url', 'image_url': {'url': str}}",
                       param="messages")
    if url.startswith("data:"):
        return
    host = urllib.parse.urlsplit(url).hostname if url.startswith(("http://", "https://")) else None
    if host is None or host.lower() not in allowed_media_domains:
        raise ApiError(400, "an image must be a data: URL, or an http(s) URL on a host the server was started to "
                            "allow (--allowed-media-domains)", param="messages")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        raise ApiError(400, f"the image's host {host!r} cannot be resolved", param="messages") from None
    if any(not ipaddress.ip_address(address.split("%")[0]).is_global for address in addresses):
        raise ApiError(400, f"the image's host {host!r} is a loopback or private address", param="messages")


def chat_messages(value, allowed_media_domains: frozenset[str] = frozenset()) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "`messages` must be a non-empty list of messages", param="messages")
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, "each message must be an object with a string `role`", param="messages")
        extra = sorted(name for name, field in message.items()
                       if name not in MESSAGE_FIELDS and field not in (None, [], {}))
        if extra:
            raise ApiError(400, f"`messages[{index}].{extra[0]}` is not supported by this server", param="messages")
        calls = message.get("tool_calls")
        if calls not in (None, []) and (message["role"] != "assistant" or not isinstance(calls, list) or not all(
                isinstance(call, dict) and isinstance(call.get("function"), dict)
                and isinstance(call["function"].get("name"), str) and isinstance(call["function"].get("arguments"), str)
                for call in calls)):
            raise ApiError(400, f"`messages[{index}].tool_calls` must be an assistant's list of {{'function': "
                                "{'name': str, 'arguments': str}}", param="messages")
        if message.get("tool_call_id") is not None and (message["role"] != "tool"
                                                        or not isinstance(message["tool_call_id"], str)):
            raise ApiError(400, f"`messages[{index}].tool_call_id` must be a string, on a `tool` message",
                           param="messages")
        content = message.get("content")
        if not (content is None or isinstance(content, (str, list))):
            raise ApiError(400, "message content must be a string or a list of parts", param="messages")
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                _image_url(part, allowed_media_domains)
            elif not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                      and set(part) == {"type", "text"}):
                raise ApiError(400, "a content part must be {'type': 'text', 'text': str} or {'type': 'image_url', "
                                    "'image_url': {'url': str}}", param="messages")
    return value


def has_images(messages: list[dict]) -> bool:
    return any(isinstance(part, dict) and part.get("type") == "image_url"
               for message in messages if isinstance(message.get("content"), list) for part in message["content"])


def message_characters(messages: list[dict]) -> int:
    """Characters of the messages' text, all of which the rendered prompt holds."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(part["text"]) for part in content if part["type"] == "text")
    return total


def bad_value(error: ValueError) -> ApiError:
    """A 400 from a ValueError of the package, whose messages name the parameter in backquotes; OpenAI's
    body has a field for it, under the name the request used."""
    name = re.search(r"`(\w+)`", str(error))
    name = name.group(1) if name else None
    return ApiError(400, str(error), param=API_NAMES.get(name, name))


def sampling_filters(body: dict) -> dict:
    """The request's `top_k`, `top_p` and `min_p`, as `resolve_settings` takes them (`top_k` -1, as vLLM
    writes no limit, is 0 here); their values are checked there."""
    top_k = body.get("top_k")
    return {"top_k": 0 if top_k is None or top_k == -1 else top_k,
            "top_p": 1.0 if body.get("top_p") is None else body["top_p"],
            "min_p": 0.0 if body.get("min_p") is None else body["min_p"]}


def endings(body: dict) -> dict:
    """The request's `stop_token_ids`, `ignore_eos` and `min_tokens`, as `resolve_settings` takes them
    (their values are checked there)."""
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is not None and not isinstance(stop_token_ids, list):
        raise ApiError(400, f"`stop_token_ids` must be a list of token ids, got {stop_token_ids!r}",
                       param="stop_token_ids")
    return {"stop_token_ids": tuple(stop_token_ids or ()),
            "ignore_eos": False if body.get("ignore_eos") is None else body["ignore_eos"],
            "min_tokens": 0 if body.get("min_tokens") is None else body["min_tokens"]}


def penalties(body: dict) -> dict:
    """The request's penalties, as `resolve_settings` takes them (their values are checked there)."""
    return {name: default if body.get(name) is None else body[name] for name, default in PENALTIES.items()}


def choices(body: dict, most: int) -> int:
    """The request's `n`: how many answers it wants, from 1 to `most`."""
    n = body.get("n")
    if n is None:
        return 1
    if not is_int(n) or not 1 <= n <= most:
        raise ApiError(400, f"`n` must be an integer from 1 to {most} (answers this server can hold at once), "
                            f"got {n!r}", param="n")
    return n


# The most likely tokens `/v1/completions` shows beside each answer token, as OpenAI's legacy API allows.
MAX_COMPLETION_LOGPROBS = 5


def logprobs_wanted(body: dict, chat: bool, stream: bool) -> int | None:
    """How many of the most likely tokens to show beside each answer token's log-probability, or None for
    no log-probabilities: chat's `logprobs` and `top_logprobs`, or completions' `logprobs`."""
    if chat:
        wanted, top = body.get("logprobs"), body.get("top_logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise ApiError(400, f"`logprobs` must be a boolean, got {wanted!r}", param="logprobs")
        if top is not None and not wanted:
            raise ApiError(400, "`top_logprobs` needs `logprobs: true`", param="top_logprobs")
        count = (top or 0) if wanted else None
        if count is not None and not (is_int(count) and 0 <= count <= 20):
            raise ApiError(400, f"`top_logprobs` must be an integer from 0 to 20, got {count!r}", param="top_logprobs")
    else:
        count = body.get("logprobs")
        if count is not None and not (is_int(count) and 0 <= count <= MAX_COMPLETION_LOGPROBS):
            raise ApiError(400, f"`logprobs` must be an integer from 0 to {MAX_COMPLETION_LOGPROBS}, got {count!r}",
                           param="logprobs")
    if count is not None and stream:
        raise ApiError(400, "log-probabilities come with whole answers only, not with `stream`", param="logprobs")
    return count


def tool_settings(body: dict) -> tuple[list[dict] | None, str | None]:
    """The request's `tools` (None without any) and what `tool_choice` asks: "auto" (calls are read from the
    answer), "none" (they are not), or the name of the function the answer must call."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(
                isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict)
                and isinstance(tool["function"].get("name"), str) for tool in tools):
            raise ApiError(400, "`tools` must be a list of {'type': 'function', 'function': {'name': str, ...}}",
                           param="tools")
        tools = tools or None
    choice = body.get("tool_choice")
    names = [tool["function"]["name"] for tool in tools or ()]
    if choice is None or choice in ("auto", "none"):
        return tools, None if tools is None else choice or "auto"
    if choice == "required":
        raise ApiError(400, "`tool_choice` \"required\" cannot be enforced by this server: name the function "
                            "instead, or use \"auto\"", param="tool_choice")
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or name not in names:
        raise ApiError(400, f"`tool_choice` must be \"none\", \"auto\" or a function of `tools` ({names}), "
                            f"got {choice!r}", param="tool_choice")
    return tools, name
