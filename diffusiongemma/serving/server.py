"""An OpenAI-compatible HTTP server over the continuous-batching scheduler (`diffusiongemma serve`).

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, `GET /health` and
`GET /metrics` (Prometheus text). With `api_key` set, the `/v1/` endpoints want `Authorization: Bearer
KEY`; health and metrics stay open for probes and scrapers.

Request fields: `messages` (text parts only) or `prompt` (a string, a one-string list, or token ids),
`max_tokens` or `max_completion_tokens` (left out: the checkpoint's length, within the room the prompt
leaves), `temperature` (0 to 2; scales both ends of the denoising temperature schedule, see
`scheduler.Settings`), `seed`, `stop` (a string or up to four), `n` (1 only), `stream`, `stream_options`
(`include_usage`, and the extension `include_drafts`), and DiffusionGemma's own `max_denoising_steps`,
`entropy_bound`, `t_min`, `t_max`, `stability_threshold` and `confidence_threshold`. Unknown fields are
ignored, as OpenAI clients send many; options that would change the answer and are not implemented
(`logprobs`, `echo`, `best_of`, `suffix`, `tools`, `logit_bias`, `top_p` below 1) are refused.

`finish_reason` is "stop" for an end-of-sequence token or a stop string (the text ends before it) and
"length" otherwise; the answer never runs past `max_tokens`, though the model denoises whole canvases.
`usage.completion_tokens` counts the tokens kept: through the end-of-sequence token, at most
`max_tokens`, and with a stop string every token up to the end of the canvas that held it.

A streamed answer arrives one committed canvas at a time. With `include_drafts`, every denoising step
also sends the canvas's current argmax text as a chunk whose choice has no content but a `draft`
field (in `delta` for chat, beside `text` for completions), which standard clients ignore. A stream
that fails after it started ends with an `{"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import time
import uuid

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException

from . import scheduler as engine
from .scheduler import (
    Delta,
    Draft,
    Failed,
    Finished,
    QueueFull,
    Scheduler,
    resolve_settings,
)

# How often a non-streaming request looks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.5
MAX_STOP_STRINGS = 4
# Generation parameters whose request field has another name.
API_NAMES = {"max_new_tokens": "max_tokens", "sampler_config": "entropy_bound"}
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias")


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _bad_value(error: ValueError) -> ApiError:
    # The package's messages name the parameter in backquotes; OpenAI's body has a field for it, under
    # the name the request used.
    name = re.search(r"`(\w+)`", str(error))
    param = name.group(1) if name else None
    return ApiError(400, str(error), param=API_NAMES.get(param, param))


def _refuse_constant(name: str):
    # Python's JSON reader accepts NaN and Infinity, which JSON does not have and no parameter can take.
    raise ValueError(f"{name} is not JSON")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is not None and (not _is_int(value) or value < 1):
        raise ApiError(400, f"`{name}` must be a positive integer, got {value!r}", param=name)
    return value


def _stop_strings(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"`stop` must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
                       param="stop")
    return tuple(stops)


def _stream_options(body: dict) -> tuple[bool, bool, bool]:
    """(stream, include_usage, include_drafts)."""
    stream, options = body.get("stream", False), body.get("stream_options")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, f"`stream` must be a boolean, got {stream!r}", param="stream")
    if options is None:
        return stream, False, False
    if not isinstance(options, dict):
        raise ApiError(400, "`stream_options` must be an object", param="stream_options")
    if not stream:
        raise ApiError(400, "`stream_options` is only allowed with `stream: true`", param="stream_options")
    flags = []
    for name in ("include_usage", "include_drafts"):
        value = options.get(name, False)
        if not isinstance(value, bool):
            raise ApiError(400, f"`stream_options.{name}` must be a boolean, got {value!r}", param="stream_options")
        flags.append(value)
    return stream, *flags


def _check_supported(body: dict) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(400, f"only `n` = 1 is supported, got {n!r}", param="n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise ApiError(400, "`best_of` is not supported", param="best_of")
    top_p = body.get("top_p")
    if top_p is not None and top_p != 1:
        raise ApiError(400, "`top_p` is not supported (the denoising sampler has its own acceptance rule)",
                       param="top_p")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}, 0):
            raise ApiError(400, f"`{name}` is not supported by this server", param=name)


def _chat_messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "`messages` must be a non-empty list of messages", param="messages")
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, "each message must be an object with a string `role`", param="messages")
        content = message.get("content")
        parts = content if isinstance(content, list) else []
        if not (content is None or isinstance(content, str) or isinstance(content, list)) or any(
                not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str)
                for part in parts):
            raise ApiError(400, "message content must be a string or a list of {'type': 'text', 'text': str} "
                                "parts; images are not supported by this server", param="messages")
    return value


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
    add("requests_received_total", "counter", "Requests received, by endpoint.",
        [(f'{{endpoint="{k}"}}', v) for k, v in sorted(counters.received.items())])
    add("requests_rejected_total", "counter", "Requests refused before they were queued, by HTTP status.",
        [(f'{{status="{k}"}}', v) for k, v in sorted(counters.rejected.items())])
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
               max_prompt_tokens: int | None = None, api_key: str | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the scheduler's worker thread."""
    positions = model.config.text_config.max_position_embeddings
    max_prompt_tokens = positions - 1 if max_prompt_tokens is None else max_prompt_tokens
    if not _is_int(max_prompt_tokens) or max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be a positive integer, got {max_prompt_tokens!r}")
    scheduler = Scheduler(model, processor.tokenizer, max_batch=max_batch, max_queue=max_queue)
    counters = _Counters()
    vocab_size = model.config.text_config.vocab_size
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="diffusiongemma", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        counters.rejected[str(error.status)] += 1
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    def authorize(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError(401, "missing or incorrect API key", code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body(), parse_constant=_refuse_constant)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def completion_prompt(value) -> list[int]:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]
        if isinstance(value, str):
            return processor.tokenizer.encode(value)
        if isinstance(value, list) and value and all(_is_int(t) and 0 <= t < vocab_size for t in value):
            return value
        raise ApiError(400, "`prompt` must be a string, a list of one string, or a non-empty list of token ids "
                            f"below {vocab_size}", param="prompt")

    def chat_prompt(messages: list[dict]) -> list[int]:
        try:
            ids = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_tensors="pt")
        except (ValueError, jinja2.TemplateError) as error:
            raise ApiError(400, f"the messages do not fit the chat template: {error}", param="messages") from None
        return ids[0].tolist()

    async def generate(request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        counters.received[endpoint] += 1
        authorize(request)
        body = await read_body(request)
        _check_supported(body)
        stream, include_usage, include_drafts = _stream_options(body)
        max_tokens = _positive_int(body, "max_completion_tokens") if chat else None
        if max_tokens is None:
            max_tokens = _positive_int(body, "max_tokens")
        seed = body.get("seed")
        if seed is not None and not (_is_int(seed) and -2**63 <= seed < 2**64):
            raise ApiError(400, f"`seed` must be a 64-bit integer, got {seed!r}", param="seed")
        temperature = body.get("temperature")
        if chat:
            prompt_ids = chat_prompt(_chat_messages(body.get("messages")))
        else:
            prompt_ids = completion_prompt(body.get("prompt"))
        if len(prompt_ids) > max_prompt_tokens:
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens long; this server takes at most "
                                f"{max_prompt_tokens}", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        try:
            settings = resolve_settings(model, len(prompt_ids), max_tokens=max_tokens,
                                        temperature=1.0 if temperature is None else temperature,
                                        stop=_stop_strings(body.get("stop")), seed=seed,
                                        **{name: body.get(name) for name in engine.TUNABLE})
        except ValueError as error:
            raise _bad_value(error) from None

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop closed: nobody will read this answer
                job.cancel()

        job = engine.Request(prompt_ids, settings, emit, drafts=stream and include_drafts)
        try:
            scheduler.submit(job)
        except QueueFull as error:
            raise ApiError(429, f"the server is busy: {error}; retry later", code="queue_full",
                           kind="rate_limit_error") from None
        except RuntimeError as error:  # the server is shutting down
            raise ApiError(503, str(error), kind="server_error") from None
        shape = _Shape(chat, model_name)
        if stream:
            return _JobStream(job, _sse(events, shape, include_usage))
        return await _answer(request, job, events, shape)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "diffusiongemma"}]}

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return JSONResponse({"status": "scheduler stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(scheduler, counters), media_type="text/plain; version=0.0.4")

    return app


class _Shape:
    """Builds the OpenAI objects of one answer: chat or text completion, whole or in chunks."""

    def __init__(self, chat: bool, model_name: str):
        self.chat, self.model_name = chat, model_name
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _object(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name,
                "choices": choices, **extra}

    @staticmethod
    def usage(outcome: Finished) -> dict:
        return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
                "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}

    def whole(self, outcome: Finished) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": outcome.text}}
        else:
            choice = {"index": 0, "text": outcome.text}
        choice.update(finish_reason=outcome.finish_reason, logprobs=None)
        return self._object("chat.completion" if self.chat else "text_completion", [choice],
                            usage=self.usage(outcome))

    def chunk(self, text: str | None = None, draft: str | None = None, finish_reason: str | None = None,
              role: bool = False, **extra) -> dict:
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            if draft is not None:
                delta["draft"] = draft
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
            if draft is not None:
                choice["draft"] = draft
        choice.update(finish_reason=finish_reason, logprobs=None)
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [choice], **extra)

    def usage_chunk(self, outcome: Finished) -> dict:
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [],
                            usage=self.usage(outcome))


def _event(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse(events: asyncio.Queue, shape: _Shape, include_usage: bool):
    usage = {"usage": None} if include_usage else {}
    if shape.chat:
        yield _event(shape.chunk(text="", role=True, **usage))
    while True:
        event = await events.get()
        if isinstance(event, Draft):
            yield _event(shape.chunk(draft=event.text, **usage))
        elif isinstance(event, Delta):
            yield _event(shape.chunk(text=event.text, **usage))
        elif isinstance(event, Finished):
            yield _event(shape.chunk(text="" if shape.chat else None, finish_reason=event.finish_reason, **usage))
            if include_usage:
                yield _event(shape.usage_chunk(event))
            break
        else:
            yield _event(ApiError(500, event.message, kind="server_error").body())
            break
    yield _event("[DONE]")


class _JobStream(StreamingResponse):
    """Server-sent events of one request, cancelled however the response ends: a client that leaves
    may do so before the event generator ever starts, so the generator's own cleanup is not enough."""

    def __init__(self, job: engine.Request, content):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def _answer(request: Request, job: engine.Request, events: asyncio.Queue, shape: _Shape) -> Response:
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)
                continue
            if isinstance(event, Finished):
                return JSONResponse(shape.whole(event))
            if isinstance(event, Failed):
                return JSONResponse(ApiError(500, event.message, kind="server_error").body(), status_code=500)
    finally:
        job.cancel()


def serve(model_path: str, model_name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = 8, max_queue: int = 64, max_prompt_tokens: int | None = None, api_key: str | None = None,
          device: str = "auto", dtype: str = "auto") -> None:
    """Loads the checkpoint and serves it, as `model_name` (default: `model_path`), until interrupted."""
    import uvicorn

    from ..hf.modeling import DiffusionGemmaForBlockDiffusion
    from ..hf.processing import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(model_path, dtype=dtype, device=device).eval()
    app = create_app(model, processor, model_name or model_path, max_batch=max_batch, max_queue=max_queue,
                     max_prompt_tokens=max_prompt_tokens, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level="info")
