"""An OpenAI-compatible HTTP server over the continuous-batching scheduler (`diffusiongemma serve`).

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, `POST /tokenize`,
`POST /detokenize`, `GET`/`HEAD /health`, `GET /version` and `GET /metrics` (Prometheus text). With an API
key, the `/v1/` endpoints and the tokenizer's want `Authorization: Bearer KEY` (the scheme in any case);
health, version and metrics stay open for probes and scrapers.

Request fields of the completion endpoints. Every field is honoured, accepted where it changes nothing, or
refused with a 400 that names it (`fields.py` holds the tables); a null counts as left out.

Honoured:
- `model`: required, and the served name (`/v1/models`); another gets 404 `model_not_found`.
- `messages` (chat: text parts, and `image_url` parts whose URL is a `data:` URL, or an http(s) URL on a host
  given to `allowed_media_domains` that resolves to public addresses only; the image is read and decoded off
  the event loop, within the image loader's size limits; a prompt with images is encoded in one piece) or
  `prompt` (completions: a string, a one-string list, or token ids).
- `max_completion_tokens` or `max_tokens` (both only if equal; left out: the checkpoint's length, within
  the room the prompt leaves), `temperature` (0 to 2; scales both ends of the denoising temperature
  schedule, see `scheduler.Settings`), `seed`, `stop` (a string or up to four),
  `include_stop_str_in_output` (the answer keeps the stop string it ended before), `stream`,
  `stream_options` (`include_usage`, `include_obfuscation: false`, and the extension `include_drafts`),
  `response_format` (`{"type": "text"}` only; JSON formats are refused), `top_k` (0 or -1: no limit),
  `top_p` and `min_p`: which tokens each position samples from; the argmax, the entropies, and with them
  acceptance and stopping, are those of the whole distribution (`sampler.SamplingFilters`);
  `stop_token_ids` (more tokens that end the answer, as the end-of-sequence tokens do), `ignore_eos` (the
  end-of-sequence tokens do not end it) and `min_tokens` (no ending token among the first that many
  answer tokens: their logits are -inf there); `presence_penalty`, `frequency_penalty` (-2 to 2) and
  `repetition_penalty` (above 0), on every position's logits, over the committed tokens
  (`scheduler.Penalties`); `n` (up to `max_batch + max_queue` answers, each its own request in the
  scheduler, seeded `seed`, `seed + 1`, ...; `usage` counts the prompt once and every answer's tokens);
  `logprobs` (chat: with `top_logprobs` up to 20; completions: up to 5), whole answers only: each answer
  token's log-probability under the last step of its canvas, whose argmax it is (`scheduler.Settings`).
- chat only: `tools` (rendered by the chat template; OpenAI's function tools), `tool_choice` ("auto": calls
  are read from the answer; "none": they are not; a named function: the answer starts with its call and
  the model writes the arguments; "required" cannot be enforced and is refused), assistant messages'
  `tool_calls` and `tool` messages' `tool_call_id` (see `tools.py`: Gemma 4's calls become `tool_calls`,
  `finish_reason` "tool_calls"; a streamed answer whose calls are read comes whole, once they are known),
  `add_generation_prompt` (default true), `continue_final_message` (default false: the answer
  continues the final message, which the template then leaves open) and `chat_template`, the last only
  on a server started with `trust_request_chat_template`, because a template runs on the server and
  can loop or allocate without bound.
- DiffusionGemma's own: `max_denoising_steps` (at most the server's limit), `entropy_bound`, `t_min`,
  `t_max`, `stability_threshold`, `confidence_threshold`.

Accepted at the values that leave a missing feature off (clients send some by default), refused at any
other: `logit_bias` {}; chat:
`functions` [], `function_call` "none" or "auto", `parallel_tool_calls` (either), `modalities` ["text"], `store` false, `service_tier` "auto" or
"default"; completions: `best_of` 1, `echo` false, `suffix` "".
Accepted and ignored, as they change no answer: `user`, `metadata`, `safety_identifier`,
`prompt_cache_key`. Refused: everything else (`audio`, `prediction`, `reasoning_effort`, ...). In a
message, fields besides `role` and `content` are refused unless empty.

`/tokenize` takes `prompt` (a string; `add_special_tokens`, default true) or `messages` (with the chat
fields above) and answers `{"count", "max_model_len", "tokens"}` (`max_model_len`: the most tokens a request may hold, prompt and
answer); `/detokenize` takes `tokens` and answers
`{"prompt"}`. Both take `model` optionally.

Limits: a body over `max_body_bytes` gets 413 (from its Content-Length, before it is read, or as soon as
more arrives), one slower than `read_timeout` 408. A prompt whose text is longer than `max_prompt_tokens`
times the vocabulary's longest piece cannot fit and gets 400 before it is tokenized; tokenizing (which lets
go of the GIL) and rendering the chat template run in worker threads, off the event loop; a prompt over
`max_prompt_tokens` gets 400 `context_length_exceeded`. The prompt and answer must fit `max_model_len` (the
model's positions, or fewer: see `Scheduler`), the
steps per canvas `max_denoising_steps_limit`, and the denoising temperatures (`temperature` times the
schedule's, at its first and last steps) `TEMPERATURE_RANGE`. `http_server` adds the connection limits.

`finish_reason` is "stop" for an end-of-sequence token or a stop string (the text ends before it) and
"length" otherwise; the answer never runs past `max_tokens`, though the model denoises whole canvases.
`usage.completion_tokens` counts the tokens kept: through the end-of-sequence token, at most
`max_tokens`, and with a stop string every token up to the end of the canvas that held it.

A streamed answer arrives one committed canvas at a time. With `include_drafts`, every denoising step
also sends the canvas's current argmax text as a chunk whose choice has no content but a `draft`
field (in `delta` for chat, beside `text` for completions), which standard clients ignore. A stream
that fails after it started ends with an `{"error": ...}` event. An error inside the engine reaches the
client as its request id (also the `x-request-id` header and the answer's `id`); the detail goes to
the server's log.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import signal
import time
import uuid
from importlib import metadata

import jinja2
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import scheduler as engine
from .fields import (
    ApiError,
    bad_value,
    chat_messages,
    check_fields,
    check_values,
    choices,
    endings,
    flag,
    has_images,
    is_int,
    logprobs_wanted,
    max_tokens,
    message_characters,
    penalties,
    response_format,
    sampling_filters,
    stop_strings,
    stream_options,
    tool_settings,
)
from .scheduler import (
    Delta,
    Draft,
    Failed,
    Finished,
    Follower,
    Leader,
    QueueFull,
    Scheduler,
    resolve_settings,
)
from .tools import call_prefix, parse_calls

logger = logging.getLogger(__name__)

# How often a non-streaming request looks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.5
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
# Denoising temperatures below this overflow the logits (NaN in the sampler, infinity in a half-precision
# self-conditioning signal); above it they flatten any distribution into noise.
TEMPERATURE_RANGE = (0.01, 100.0)
# The default limit on steps per canvas, in multiples of the checkpoint's own.
STEPS_LIMIT_FACTOR = 4
# A request's head (request line and headers) larger than this gets 400.
MAX_HEAD_BYTES = 16 * 2**10
# After the drain has ended every answer, how long the last events get to go out before uvicorn gives up.
SHUTDOWN_GRACE_SECONDS = 5
# Put in an answer's events when the server stops before the answer is done.
SHUTTING_DOWN = object()


def _refuse_constant(name: str):
    # Python's JSON reader accepts NaN and Infinity, which JSON does not have and no parameter can take.
    raise ValueError(f"{name} is not JSON")


def served_name(source: str) -> str:
    """The name a checkpoint is served as by default: a local folder's own name (its path means nothing to
    clients, and may tell them more than they need), or the Hub id as given."""
    return os.path.basename(os.path.abspath(source)) if os.path.isdir(source) else source


def _internal_error(request_id: str) -> ApiError:
    return ApiError(500, f"the server failed to answer this request; its id, {request_id}, finds the detail in "
                         "the server's log", kind="server_error")


def _shutdown_error() -> ApiError:
    return ApiError(503, "the server is shutting down and stopped this answer before it was done",
                    code="server_shutting_down", kind="server_error")


def _check_temperatures(settings: engine.Settings, body: dict) -> None:
    """Refuses settings whose denoising temperatures leave TEMPERATURE_RANGE, naming a field the request set."""
    scale = settings.temperature or 1.0  # 0 takes the argmax, with the schedule left as it is
    steps = settings.max_denoising_steps
    lowest = scale * (settings.t_min + (settings.t_max - settings.t_min) / steps)
    highest = scale * settings.t_max
    low, high = TEMPERATURE_RANGE
    if low <= lowest and highest <= high:
        return
    suspects = ("t_min", "temperature", "t_max", "max_denoising_steps") if lowest < low else ("t_max", "temperature")
    param = next((name for name in suspects if body.get(name) is not None), None)
    raise ApiError(400, f"the denoising temperatures would run from {highest:.3g} down to {lowest:.3g}: "
                        f"`temperature` times the schedule from `t_max` to `t_min` (over `max_denoising_steps`) "
                        f"must stay within {low} to {high}, where sampling is defined (for the most likely tokens, "
                        "send `temperature` 0)", param=param)


class _Counters:
    """What the HTTP side counts; the scheduler counts the rest."""

    def __init__(self):
        self.received = collections.Counter()  # by endpoint
        self.rejected = collections.Counter()  # by status code


def _prometheus(scheduler: Scheduler, counters: _Counters) -> str:
    metrics = scheduler.metrics
    lines = []

    def add(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]):
        lines.extend([f"# HELP diffusiongemma_{name} {help_text}", f"# TYPE diffusiongemma_{name} {kind}"])
        lines.extend(f"diffusiongemma_{name}{labels} {value}" for labels, value in samples)

    with metrics.lock:
        finished = dict(metrics.finished)
        generated, forwards, prompt = metrics.generated_tokens, metrics.decoder_forwards, metrics.prompt_tokens
        passes, step_batch = metrics.batched_steps, metrics.step_batch_size
        buckets, canvases, steps = list(metrics.step_buckets), metrics.canvases, metrics.steps
    add("requests_received_total", "counter", "Completion requests received, by endpoint; each is rejected, "
        "finished, running or queued.", [(f'{{endpoint="{k}"}}', v) for k, v in sorted(counters.received.items())])
    add("requests_rejected_total", "counter", "Completion requests answered with an error before they were queued, "
        "by HTTP status.", [(f'{{status="{k}"}}', v) for k, v in sorted(counters.rejected.items())])
    add("requests_finished_total", "counter", "Requests that left the scheduler, by outcome.",
        [(f'{{outcome="{k}"}}', finished.get(k, 0)) for k in ("stop", "length", "cancelled", "error")])
    add("queue_depth", "gauge", "Requests waiting for a batch slot.", [("", scheduler.queue_depth)])
    add("active_batch_size", "gauge", "Requests being denoised.", [("", scheduler.batch_size)])
    add("step_batch_size", "gauge", "Requests in the batched denoising step running or last run (rows of one "
        "decoder pass); 0 when idle.", [("", step_batch)])
    add("batched_steps_total", "counter", "Batched denoising steps run: one decoder pass each, over every running "
        "request.", [("", passes)])
    add("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [("", prompt)])
    add("generated_tokens_total", "counter", "Tokens returned to finished requests.", [("", generated)])
    add("decoder_forwards_total", "counter", "Denoising steps run, counted per request (one row of a batched "
        "step each).", [("", forwards)])
    add("tokens_per_forward", "gauge", "Generated tokens per request denoising step since start.",
        [("", generated / forwards if forwards else 0.0)])
    histogram = [(f'_bucket{{le="{bound}"}}', count) for bound, count in zip(engine.STEP_BUCKETS, buckets)]
    add("denoising_steps_per_canvas", "histogram", "Denoising steps each committed canvas took.",
        [*histogram, ('_bucket{le="+Inf"}', canvases), ("_sum", steps), ("_count", canvases)])
    return "\n".join(lines) + "\n"


def create_app(model, processor, model_name: str, max_batch: int = 8, max_queue: int = 64,
               max_prompt_tokens: int | None = None, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_denoising_steps_limit: int | None = None,
               trust_request_chat_template: bool = False, read_timeout: float = 30.0,
               allowed_media_domains: tuple[str, ...] = (), max_model_len: int | None = None,
               cuda_graphs: bool = True, lockstep: bool = False) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the scheduler's worker thread. `app.state.limits`
    holds the limits in force, `app.state.drain(timeout)` ends the answers in flight (see `http_server`).

    `max_model_len` (the most tokens a request may hold, prompt and answer) defaults to the scheduler's (see
    `Scheduler`, which `cuda_graphs=False` keeps off CUDA graphs), `max_prompt_tokens` to one less, `max_denoising_steps_limit` to STEPS_LIMIT_FACTOR times
    the checkpoint's steps per canvas.

    With `lockstep`, `model` is sharded over a torchrun job and this is rank 0: its scheduler is a `Leader`, whose
    plans the other ranks follow (`follow`)."""
    tokenizer = processor.tokenizer
    scheduler = (Leader if lockstep else Scheduler)(model, tokenizer, max_batch=max_batch, max_queue=max_queue,
                                                    max_model_len=max_model_len, cuda_graphs=cuda_graphs)
    positions = scheduler.max_model_len
    max_prompt_tokens = positions - 1 if max_prompt_tokens is None else max_prompt_tokens
    allowed_media_domains = frozenset(domain.lower() for domain in allowed_media_domains)
    checkpoint_steps = resolve_settings(model, 1).max_denoising_steps
    if max_denoising_steps_limit is None:
        max_denoising_steps_limit = STEPS_LIMIT_FACTOR * checkpoint_steps
    for name, value, least in (("max_prompt_tokens", max_prompt_tokens, 1), ("max_body_bytes", max_body_bytes, 1),
                               ("max_denoising_steps_limit", max_denoising_steps_limit, checkpoint_steps)):
        if not is_int(value) or value < least:
            raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"the served model name must be a non-empty string, got {model_name!r}")
    # What a decoded answer loses with `skip_special_tokens`: the tokenizer's special added tokens.
    special_tokens = [token.content for token in tokenizer.backend.get_added_tokens_decoder().values() if token.special]
    # No token covers more characters than the vocabulary's longest piece, so a longer text cannot fit.
    max_prompt_chars = max_prompt_tokens * max(len(piece or "") for piece in
                                                tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    counters = _Counters()
    vocab_size = model.config.text_config.vocab_size
    created = int(time.time())
    # Hashes of equal length compare in constant time whatever the key's length.
    key_digest = None if api_key is None else hashlib.sha256(api_key.encode()).digest()
    try:
        version = metadata.version("diffusiongemma")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        version = "unknown"
    in_flight: dict[engine.Request, asyncio.Queue] = {}  # requests queued or running, with their events

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="diffusiongemma", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.limits = {"max_batch": max_batch, "max_queue": max_queue, "max_model_len": positions,
                        "max_prompt_tokens": max_prompt_tokens,
                        "max_body_bytes": max_body_bytes, "max_denoising_steps_limit": max_denoising_steps_limit}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        # A body refused before it was read whole leaves the rest of it on the connection, which therefore
        # cannot carry another request.
        headers = {"Connection": "close"} if error.status in (408, 413) else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(), status_code=error.status_code,
                            headers=error.headers)

    def authorize(request: Request) -> None:
        if key_digest is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).digest()
        if not (hmac.compare_digest(given, key_digest) and scheme.lower() == "bearer"):
            raise ApiError(401, "missing or incorrect API key", code="invalid_api_key")

    def check_model(value, required: bool) -> None:
        if value is None:
            if required:
                raise ApiError(400, f"`model` is required; this server serves {model_name!r}", param="model")
            return
        if value != model_name:
            raise ApiError(404, f"the model {value!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    async def read_body(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and int(declared) > max_body_bytes:
            raise ApiError(413, f"the request body is {declared} bytes; this server takes at most {max_body_bytes}",
                           code="request_too_large")
        body = bytearray()
        try:
            async with asyncio.timeout(read_timeout):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > max_body_bytes:
                        raise ApiError(413, f"the request body is over {max_body_bytes} bytes, the most this server "
                                            "takes", code="request_too_large")
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {read_timeout} s",
                           code="request_timeout") from None
        except ClientDisconnect:
            raise ApiError(499, "the client left before it sent the whole request") from None
        try:
            parsed = json.loads(bytes(body), parse_constant=_refuse_constant)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise ApiError(400, "the request body must be a JSON object")
        check_values(parsed)
        return parsed

    def too_long(param: str, what: str) -> ApiError:
        return ApiError(400, f"the prompt is {what}; this server takes at most {max_prompt_tokens} tokens",
                        param=param, code="context_length_exceeded")

    async def chat_prompt(body: dict, bounded: bool = True) -> tuple[list[int], dict | None, str | None]:
        """The prompt's token ids, the model inputs of its images (None without images), and what the
        request's `tool_choice` asks (see `tool_settings`)."""
        messages = chat_messages(body.get("messages"), allowed_media_domains)
        template = body.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise ApiError(400, "`chat_template` must be a string", param="chat_template")
        if template is not None and not trust_request_chat_template:
            raise ApiError(400, "`chat_template` is refused: a template runs on the server, and this one was not "
                                "started to trust the requests' (--trust-request-chat-template)",
                           param="chat_template")
        continued = flag(body, "continue_final_message", False)
        opened = flag(body, "add_generation_prompt", not continued)
        if continued and opened:
            raise ApiError(400, "`continue_final_message` continues the final message and `add_generation_prompt` "
                                "starts a new one: set only one", param="continue_final_message")
        characters = message_characters(messages)
        if bounded and characters > max_prompt_chars:
            raise too_long("messages", f"{characters} characters long")
        images = has_images(messages)
        tools, choice = tool_settings(body)
        # The template reads a call's arguments as a mapping, OpenAI sends them as JSON text.
        messages = [{**m, "tool_calls": [_call_for_template(call) for call in m["tool_calls"]]} if m.get("tool_calls")
                    else m for m in messages]
        if choice not in (None, "auto", "none"):
            if continued:
                raise ApiError(400, "a named `tool_choice` starts the answer with its call, so it cannot continue "
                                    "the final message", param="tool_choice")
            # The answer starts with the named call; the model writes its arguments.
            messages = [*messages, {"role": "assistant", "content": call_prefix(choice)}]
            continued, opened = True, False
        try:
            # Off the event loop: templates, and images to decode (or fetch from an allowed host).
            inputs = await asyncio.to_thread(processor.apply_chat_template, messages, add_generation_prompt=opened,
                                             continue_final_message=continued, chat_template=template, tokenize=True,
                                             padding=False, return_dict=images, return_tensors="pt" if images else None,
                                             tools=tools)
        except (ValueError, jinja2.TemplateError) as error:
            raise ApiError(400, f"the messages do not fit the chat template, or an image cannot be read: {error}",
                           param="messages") from None
        if not images:
            return inputs[0], None, choice
        pictures = {name: inputs[name] for name in ("pixel_values", "image_position_ids", "mm_token_type_ids")}
        return inputs["input_ids"][0].tolist(), pictures, choice

    async def text_ids(text: str, add_special_tokens: bool = True) -> list[int]:
        # The tokenizer's call lets go of the GIL while it works: a long text leaves the event loop running.
        encoded = await asyncio.to_thread(tokenizer, text, add_special_tokens=add_special_tokens)
        return encoded["input_ids"]

    async def completion_prompt(value) -> list[int]:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]
        if isinstance(value, str):
            if len(value) > max_prompt_chars:
                raise too_long("prompt", f"{len(value)} characters long")
            return await text_ids(value)
        if isinstance(value, list) and value and all(is_int(t) and 0 <= t < vocab_size for t in value):
            return value
        raise ApiError(400, "`prompt` must be a string, a list of one string, or a non-empty list of token ids "
                            f"below {vocab_size}", param="prompt")

    async def admit(request: Request, chat: bool):
        """Checks a request and queues its `n` answers; returns (jobs, events, streaming, include_usage,
        include_stop)."""
        authorize(request)
        body = await read_body(request)
        check_fields(body, "chat" if chat else "completions")
        check_model(body.get("model"), required=True)
        stream, include_usage, include_drafts = stream_options(body)
        response_format(body)
        include_stop = flag(body, "include_stop_str_in_output", False)
        length = max_tokens(body)
        seed = body.get("seed")
        if seed is not None and not (is_int(seed) and -2**63 <= seed < 2**64):
            raise ApiError(400, f"`seed` must be a 64-bit integer, got {seed!r}", param="seed")
        temperature = body.get("temperature")
        n = choices(body, max_batch + max_queue)
        top_logprobs = logprobs_wanted(body, chat, stream)
        stops = stop_strings(body.get("stop"))
        if chat:
            prompt_ids, images, tool_choice = await chat_prompt(body)
        else:
            prompt_ids, images, tool_choice = await completion_prompt(body.get("prompt")), None, None
        if len(prompt_ids) > max_prompt_tokens:
            raise too_long("messages" if chat else "prompt", f"{len(prompt_ids)} tokens long")
        try:
            settings = resolve_settings(model, len(prompt_ids), max_tokens=length, max_model_len=positions,
                                        temperature=1.0 if temperature is None else temperature, stop=stops, seed=seed,
                                        logprobs=top_logprobs, **sampling_filters(body), **endings(body),
                                        **penalties(body),
                                        **{name: body.get(name) for name in engine.TUNABLE})
        except ValueError as error:
            refusal = bad_value(error)
            if refusal.param == "max_tokens" and body.get("max_tokens") is None:
                refusal.param = "max_completion_tokens"  # the name this request used
            raise refusal from None
        if settings.max_denoising_steps > max_denoising_steps_limit:
            raise ApiError(400, f"`max_denoising_steps` ({settings.max_denoising_steps}) must not exceed this "
                                f"server's limit, {max_denoising_steps_limit}", param="max_denoising_steps")
        _check_temperatures(settings, body)

        loop = asyncio.get_running_loop()
        # The answers' events, each as (its index, the event), in one queue.
        events: asyncio.Queue = asyncio.Queue()

        def emitter(index: int):
            def emit(event) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (index, event))
                except RuntimeError:  # the event loop closed: nobody will read these answers
                    for job in jobs:
                        job.cancel()
            return emit

        # Independent answers: seeds seed, seed + 1, ... (each its own random stream when unseeded).
        jobs = [engine.Request(prompt_ids, dataclasses.replace(settings, seed=None if seed is None else seed + i),
                               emitter(i), drafts=stream and include_drafts, images=images,
                               raw=tool_choice not in (None, "none")) for i in range(n)]
        try:
            for job in jobs:
                scheduler.submit(job)
        except (QueueFull, RuntimeError) as error:
            for job in jobs:
                scheduler.cancel(job)
            if isinstance(error, QueueFull):
                raise ApiError(429, f"the server is busy: {error}; retry later", code="queue_full",
                               kind="rate_limit_error") from None
            raise ApiError(503, str(error), kind="server_error") from None  # the server is shutting down
        for job in jobs:
            in_flight[job] = events
        return jobs, events, stream, include_usage, include_stop, tool_choice

    async def generate(request: Request, chat: bool):
        counters.received["chat" if chat else "completions"] += 1
        shape = _Shape(chat, model_name, tokenizer)
        try:
            jobs, events, stream, include_usage, include_stop, tool_choice = await admit(request, chat)
        except ApiError as error:
            counters.rejected[str(error.status)] += 1
            raise
        except Exception:
            counters.rejected["500"] += 1
            logger.exception("request %s failed before it was queued", shape.id)
            raise _internal_error(shape.id) from None

        # Each of the other answers counts as a request of its own, as the scheduler counts it.
        counters.received["chat" if chat else "completions"] += len(jobs) - 1

        def release() -> None:
            for job in jobs:
                scheduler.cancel(job)
                in_flight.pop(job, None)

        shape.include_stop = include_stop
        if tool_choice not in (None, "none"):
            # Calls are read from whole answers; a named call's start is the prompt's, not the answer's.
            shape.tools = (call_prefix(tool_choice) if tool_choice != "auto" else "", special_tokens)
        if stream:
            return _JobStream(_sse(events, shape, include_usage, len(jobs)), release, shape.id)
        return await _answer(request, events, shape, release, len(jobs))

    async def drain(timeout: float) -> None:
        """Gives the answers in flight `timeout` seconds to finish, then ends each with word of the shutdown."""
        deadline = time.monotonic() + timeout
        while in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        told = set()
        for job, events in list(in_flight.items()):
            scheduler.cancel(job)
            if id(events) not in told:
                told.add(id(events))
                events.put_nowait((0, SHUTTING_DOWN))

    app.state.drain = drain

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    async def tokenizer_body(request: Request, endpoint: str) -> dict:
        """The checked body of a request to a tokenizer endpoint (`model` may be left out there)."""
        authorize(request)
        body = await read_body(request)
        check_fields(body, endpoint)
        check_model(body.get("model"), required=False)
        return body

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await tokenizer_body(request, "tokenize")
        if (body.get("prompt") is None) == (body.get("messages") is None):
            raise ApiError(400, "send either `prompt` or `messages`", param="prompt")
        if body.get("messages") is not None:
            if body.get("add_special_tokens") is not None:
                raise ApiError(400, "`add_special_tokens` goes with `prompt`; with `messages` the chat template "
                                    "decides", param="add_special_tokens")
            ids, _, _ = await chat_prompt(body, bounded=False)
        else:
            if not isinstance(body["prompt"], str):
                raise ApiError(400, "`prompt` must be a string", param="prompt")
            for name in ("chat_template", "add_generation_prompt", "continue_final_message"):
                if body.get(name) is not None:
                    raise ApiError(400, f"`{name}` goes with `messages`", param=name)
            ids = await text_ids(body["prompt"], flag(body, "add_special_tokens", True))
        return {"count": len(ids), "max_model_len": positions, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await tokenizer_body(request, "detokenize")
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(is_int(t) and 0 <= t < vocab_size for t in ids):
            raise ApiError(400, f"`tokens` must be a list of token ids below {vocab_size}", param="tokens")
        return {"prompt": await asyncio.to_thread(tokenizer.decode, ids)}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "diffusiongemma"}]}

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if not scheduler.alive:
            return JSONResponse({"status": "scheduler stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/version")
    async def version_endpoint():
        return {"version": version}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(scheduler, counters), media_type="text/plain; version=0.0.4")

    return app


class _Shape:
    """Builds the OpenAI objects of one answer: chat or text completion, whole or in chunks."""

    def __init__(self, chat: bool, model_name: str, tokenizer):
        self.chat, self.model_name, self.tokenizer = chat, model_name, tokenizer
        # Where tool calls are read from the answers: (how each answer starts, the special tokens to drop).
        self.tools: tuple[str, list[str]] | None = None
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.include_stop = False

    def _object(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name,
                "choices": choices, **extra}

    def tail(self, outcome: Finished) -> str:
        """What follows the answer's text: the stop string it ended before, where the request keeps it."""
        return outcome.stop if self.include_stop and outcome.stop is not None else ""

    @staticmethod
    def usage(outcomes: list[Finished]) -> dict:
        """The prompt once, and every answer's tokens, as OpenAI counts `n` answers."""
        prompt, completion = outcomes[0].prompt_tokens, sum(outcome.completion_tokens for outcome in outcomes)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def calls(self, outcome: Finished) -> tuple[str, list[dict]]:
        """(content, tool calls) of an answer where calls are read, else (its text, [])."""
        if self.tools is None:
            return outcome.text + self.tail(outcome), []
        start, special = self.tools
        return parse_calls(start + outcome.raw, special)

    def whole(self, outcomes: list[Finished]) -> dict:
        answers = []
        for index, outcome in enumerate(outcomes):
            text, calls = self.calls(outcome)
            if self.chat:
                message = {"role": "assistant", "content": text or (None if calls else text)}
                choice = {"index": index, "message": {**message, "tool_calls": calls} if calls else message}
            else:
                choice = {"index": index, "text": text}
            choice.update(finish_reason="tool_calls" if calls else outcome.finish_reason,
                          logprobs=self.logprobs(outcome))
            answers.append(choice)
        return self._object("chat.completion" if self.chat else "text_completion", answers,
                            usage=self.usage(outcomes))

    def logprobs(self, outcome: Finished) -> dict | None:
        """OpenAI's `logprobs` of a whole answer: chat's list of tokens, or completions' parallel lists."""
        if outcome.logprobs is None:
            return None
        piece = lambda token: self.tokenizer.decode([token])  # noqa: E731
        if self.chat:
            return {"content": [
                {"token": piece(token), "logprob": value, "bytes": list(piece(token).encode()),
                 "top_logprobs": [{"token": piece(t), "logprob": v, "bytes": list(piece(t).encode())} for t, v in best]}
                for token, value, best in outcome.logprobs]}
        pieces = [piece(token) for token, _, _ in outcome.logprobs]
        offsets = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
        return {"tokens": pieces, "token_logprobs": [value for _, value, _ in outcome.logprobs],
                "top_logprobs": [{piece(t): v for t, v in best} for _, _, best in outcome.logprobs],
                "text_offset": offsets}

    def chunk(self, index: int, text: str | None = None, draft: str | None = None, finish_reason: str | None = None,
              role: bool = False, calls: list[dict] | None = None, **extra) -> dict:
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
            if draft is not None:
                delta["draft"] = draft
            choice = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text or ""}
            if draft is not None:
                choice["draft"] = draft
        choice.update(finish_reason=finish_reason, logprobs=None)
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [choice], **extra)

    def usage_chunk(self, outcomes: list[Finished]) -> dict:
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [],
                            usage=self.usage(outcomes))


def _call_for_template(call: dict) -> dict:
    """An OpenAI tool call of an earlier turn as chat templates read it: the arguments as a mapping."""
    try:
        arguments = json.loads(call["function"]["arguments"])
    except ValueError:
        raise ApiError(400, "a tool call's `arguments` must be JSON", param="messages") from None
    return {**call, "function": {**call["function"], "arguments": arguments}}


def _event(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _failure(event, request_id: str) -> ApiError:
    """The error a client gets for an answer that ended without finishing; an engine's own words stay in the log."""
    if event is SHUTTING_DOWN:
        return _shutdown_error()
    logger.error("request %s failed in the engine: %s", request_id, event.message)
    return _internal_error(request_id)


async def _sse(events: asyncio.Queue, shape: _Shape, include_usage: bool, answers: int):
    usage = {"usage": None} if include_usage else {}
    if shape.chat:
        for index in range(answers):
            yield _event(shape.chunk(index, text="", role=True, **usage))
    finished: dict[int, Finished] = {}
    while len(finished) < answers:
        index, event = await events.get()
        if isinstance(event, (Draft, Delta)) and shape.tools is not None:
            continue  # where calls are read, the answer goes out whole, once its calls are known
        if isinstance(event, Draft):
            yield _event(shape.chunk(index, draft=event.text, **usage))
        elif isinstance(event, Delta):
            yield _event(shape.chunk(index, text=event.text, **usage))
        elif isinstance(event, Finished):
            if shape.tools is not None:
                text, calls = shape.calls(event)
                if text or calls:
                    yield _event(shape.chunk(index, text=text or None, calls=calls, **usage))
                reason = "tool_calls" if calls else event.finish_reason
            else:
                if shape.tail(event):
                    yield _event(shape.chunk(index, text=shape.tail(event), **usage))
                reason = event.finish_reason
            yield _event(shape.chunk(index, text="" if shape.chat else None, finish_reason=reason, **usage))
            finished[index] = event
        else:
            yield _event(_failure(event, shape.id).body())
            break
    else:
        if include_usage:
            yield _event(shape.usage_chunk([finished[index] for index in range(answers)]))
    yield _event("[DONE]")


class _JobStream(StreamingResponse):
    """Server-sent events of one request, released however the response ends: a client that leaves
    may do so before the event generator ever starts, so the generator's own cleanup is not enough."""

    def __init__(self, content, release, request_id: str):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "x-request-id": request_id})
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


async def _answer(request: Request, events: asyncio.Queue, shape: _Shape, release, answers: int) -> Response:
    headers = {"x-request-id": shape.id}
    finished: dict[int, Finished] = {}
    try:
        while True:
            try:
                index, event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)
                continue
            if isinstance(event, Finished):
                finished[index] = event
                if len(finished) == answers:
                    return JSONResponse(shape.whole([finished[i] for i in range(answers)]), headers=headers)
            if isinstance(event, Failed) or event is SHUTTING_DOWN:
                error = _failure(event, shape.id)
                return JSONResponse(error.body(), status_code=error.status, headers=headers)
    finally:
        release()


class _Config(uvicorn.Config):
    """uvicorn's settings with the two limits `_Protocol` adds."""

    def __init__(self, app, read_timeout: float, max_connections: int, **settings):
        super().__init__(app, http=_Protocol, **settings)
        self.read_timeout, self.max_connections = read_timeout, max_connections
        self.at_connection_limit = False  # so that reaching it is logged once, not per refused connection


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with two limits it lacks. A client must send each request's head within
    `read_timeout` seconds of connecting or of the previous answer, so that a connection that stalls
    halfway through a head is closed (uvicorn's keep-alive timeout ends once any byte arrives). And at most
    `max_connections` are open: one more is closed at once, so that idle connections cannot use up the
    process's files."""

    config: _Config

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.head_timer = None
        if len(self.connections) > self.config.max_connections:
            if not self.config.at_connection_limit:
                logger.warning("%d connections are open, the most allowed; closing new ones until some end",
                               self.config.max_connections)
            self.config.at_connection_limit = True
            transport.close()
            return
        self.config.at_connection_limit = False
        self._await_head()

    def _await_head(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.head_timer = self.loop.call_later(self.config.read_timeout, self._head_overdue)

    def _head_overdue(self) -> None:
        self.head_timer = None
        if self.cycle is None or self.cycle.response_complete:  # no request is being answered: its head is late
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_head()

    def connection_lost(self, exc) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        super().connection_lost(exc)


class _Server(uvicorn.Server):
    """A uvicorn server that, told to stop, gives the answers in flight `shutdown_timeout` seconds and then
    ends them with word why (`app.state.drain`), instead of waiting for them however long they take."""

    def __init__(self, config: _Config, shutdown_timeout: float):
        super().__init__(config)
        self.shutdown_timeout = shutdown_timeout

    async def shutdown(self, sockets=None) -> None:
        draining = asyncio.create_task(self.config.app.state.drain(self.shutdown_timeout))
        try:
            await super().shutdown(sockets)
        finally:
            draining.cancel()


def _log_config(level: str) -> dict:
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["diffusiongemma"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def http_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, read_timeout: float = 30.0,
                keep_alive_timeout: float = 5.0, max_connections: int = 512, shutdown_timeout: float = 30.0,
                log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for `create_app`'s app (`.run()` serves until SIGINT or SIGTERM).

    Besides the app's limits: a request's head must arrive within `read_timeout` seconds and hold at most
    MAX_HEAD_BYTES; an idle connection closes after `keep_alive_timeout` seconds; at most `max_connections`
    are open at once. Told to stop, it stops listening and gives the answers in flight `shutdown_timeout`
    seconds, then ends each: a stream with an error event, a whole answer with 503."""
    for name, value in (("read_timeout", read_timeout), ("keep_alive_timeout", keep_alive_timeout),
                        ("shutdown_timeout", shutdown_timeout)):
        if not value >= 0:
            raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
    if not is_int(max_connections) or max_connections < 1:
        raise ValueError(f"max_connections must be a positive integer, got {max_connections!r}")
    config = _Config(app, read_timeout, max_connections, host=host, port=port, lifespan="on",
                     timeout_keep_alive=keep_alive_timeout, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                     timeout_graceful_shutdown=shutdown_timeout + SHUTDOWN_GRACE_SECONDS,
                     log_level=log_level, log_config=_log_config(log_level))
    return _Server(config, shutdown_timeout)


def serve(model_path: str, model_name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = 8, max_queue: int = 64, max_prompt_tokens: int | None = None, api_key: str | None = None,
          device: str = "auto", dtype: str = "auto", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          max_denoising_steps_limit: int | None = None, trust_request_chat_template: bool = False,
          read_timeout: float = 30.0, keep_alive_timeout: float = 5.0, max_connections: int = 512,
          shutdown_timeout: float = 30.0, log_level: str = "info", allowed_media_domains: tuple[str, ...] = (),
          max_model_len: int | None = None, cuda_graphs: bool = True, tensor_parallel: bool = False,
          quantization: str | None = None) -> None:
    """Loads the checkpoint and serves it, as `model_name` (default: `served_name(model_path)`), until
    interrupted. With `tensor_parallel`, in a torchrun job this process has joined (`runtime.start`), every rank
    loads its shards; rank 0 serves, the others follow its scheduler (`Follower`) and return when it stops.
    `quantization`: as `from_pretrained` takes it. The process flushes subnormal floats to zero."""
    from ..distributed import runtime

    # Late denoising steps run at a low temperature, where most probabilities fall below float32's smallest
    # normal number (about 1.2e-38); the CPU computes with such subnormal numbers many times slower, and a
    # served float32 model's later steps took up to 3.5 times as long as its first. Flushed to zero, they change
    # a sum only where the sum itself is that small (docs/serving.md). Set before the model loads, so that
    # every thread the process starts (torch's intra-op threads, the scheduler's worker) inherits it.
    torch.set_flush_denormal(True)
    from ..hf.modeling import DiffusionGemmaForBlockDiffusion
    from ..hf.processing import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(model_path, dtype=dtype, device=device,
                                                            tp_plan="auto" if tensor_parallel else None,
                                                            quantization=quantization).eval()
    if tensor_parallel and not runtime.is_leader():
        follow(model, processor.tokenizer, max_batch=max_batch, max_model_len=max_model_len, cuda_graphs=cuda_graphs)
        return
    name = model_name or served_name(model_path)
    app = create_app(model, processor, name, max_batch=max_batch, max_queue=max_queue,
                     max_prompt_tokens=max_prompt_tokens, api_key=api_key, max_body_bytes=max_body_bytes,
                     max_denoising_steps_limit=max_denoising_steps_limit,
                     trust_request_chat_template=trust_request_chat_template, read_timeout=read_timeout,
                     allowed_media_domains=allowed_media_domains, max_model_len=max_model_len,
                     cuda_graphs=cuda_graphs, lockstep=tensor_parallel)
    server = http_server(app, host, port, read_timeout=read_timeout, keep_alive_timeout=keep_alive_timeout,
                         max_connections=max_connections, shutdown_timeout=shutdown_timeout, log_level=log_level)
    limits = app.state.limits
    weights = next(model.parameters())
    logger.info("serving %s as %r on %s in %s, %s parameters; at most %d requests side by side and %d waiting, "
                "%d tokens a request, %d of them prompt, %d bytes a body, %d denoising steps a canvas, %d connections; API key %s; "
                "listening on http://%s:%d", model_path, name, weights.device,
                str(weights.dtype).removeprefix("torch."), f"{sum(p.numel() for p in model.parameters()):,}",
                limits["max_batch"], limits["max_queue"], limits["max_model_len"],
                limits["max_prompt_tokens"], limits["max_body_bytes"], limits["max_denoising_steps_limit"],
                max_connections, "required" if api_key is not None else "off", host, port)
    server.run()


def follow(model, tokenizer, **settings) -> None:
    """A follower rank's part in a sharded server: runs the ticks rank 0's scheduler plans, with rank 0's
    scheduler `settings`, until rank 0 stops it. SIGINT and SIGTERM are left to rank 0, which gets them too
    (torchrun passes the signal it gets on to every rank): a follower that ended at once would leave rank 0's
    answers in flight, and its last plan, without their collectives' other half."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Follower(model, tokenizer, **settings).follow()
