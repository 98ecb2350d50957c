"""The server against abuse and mistakes (issue #19): oversized and slow requests, out-of-range values,
fields it would drop, abandoned requests, stalled connections and shutdown. After every fault the
request counts in /metrics must still add up.

Servers run as in test_server.py: on 127.0.0.1, from a thread, stopped before the test returns.
"""

import contextlib
import json
import os
import socket
import threading
import time

import httpx
import openai
import pytest
from test_server import (
    API_KEY,
    ENDLESS,
    FAST,
    MODEL,
    WAIT_SECONDS,
    client,
    running,
    server_log,
    wait_for,
)

from diffusiongemma.cli.main import main
from diffusiongemma.hf.tokenizer import DiffusionGemmaTokenizer
from diffusiongemma.serving import server as server_module
from diffusiongemma.serving.server import (
    SHUTDOWN_GRACE_SECONDS,
    create_app,
    http_server,
)

MAX_BODY = 32 * 1024
MAX_PROMPT_TOKENS = 100
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tiny):
    model, processor = tiny
    app = create_app(model, processor, MODEL, max_batch=2, max_queue=8, max_prompt_tokens=MAX_PROMPT_TOKENS,
                     api_key=API_KEY, max_body_bytes=MAX_BODY)
    with running(app) as url:
        yield url, app


def metrics(url) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("diffusiongemma_"):
            name, value = line.removeprefix("diffusiongemma_").rsplit(" ", 1)
            values[name] = float(value)
    return values


def assert_counts_add_up(url):
    """Every completion request received is rejected, finished (any outcome), running or queued."""
    def total(values, prefix):
        return sum(value for name, value in values.items() if name.startswith(prefix + "{"))

    def balanced():
        values = metrics(url)
        accounted = (total(values, "requests_rejected_total") + total(values, "requests_finished_total")
                     + values["active_batch_size"] + values["queue_depth"])
        return total(values, "requests_received_total") == accounted

    wait_for(balanced, "received = rejected + finished + running + queued in /metrics")


def post(url, path, body, headers=AUTH, **options):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=WAIT_SECONDS, **options)


def refused(response, status, param):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"], error
    return error


def connect(url) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(WAIT_SECONDS)
    return sock


def status_line(sock) -> bytes:
    return sock.recv(65536).split(b"\r\n", 1)[0]


# 1. Large bodies and prompts.

def test_body_over_the_limit_is_refused_before_it_is_read(server):
    url, _ = server
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\n")
    with contextlib.closing(connect(url)) as sock:
        # 50 MB announced, none sent: the answer comes from the header alone.
        sock.sendall(f"{head}Content-Length: 50000000\r\n\r\n".encode())
        started = time.monotonic()
        assert status_line(sock) == b"HTTP/1.1 413 Request Entity Too Large"
        assert time.monotonic() - started < 5
    with contextlib.closing(connect(url)) as sock:
        # No length announced: counted as it arrives.
        sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
        piece = b"x" * (MAX_BODY // 2)
        for _ in range(3):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        assert status_line(sock) == b"HTTP/1.1 413 Request Entity Too Large"
    assert httpx.get(f"{url}/health").status_code == 200
    assert_counts_add_up(url)


def test_overlong_prompt_is_refused_without_tokenizing(server, monkeypatch):
    url, _ = server
    calls = []
    for name in ("encode", "__call__"):
        original = getattr(DiffusionGemmaTokenizer, name)
        monkeypatch.setattr(DiffusionGemmaTokenizer, name,
                            lambda self, *args, _original=original, **kwargs: calls.append(1) or
                            _original(self, *args, **kwargs))
    text = "y" * (MAX_BODY // 2)  # within the body limit, beyond any MAX_PROMPT_TOKENS tokens
    error = refused(post(url, "/v1/completions", {"model": MODEL, "prompt": text}), 400, "prompt")
    assert error["code"] == "context_length_exceeded" and "characters" in error["message"]
    error = refused(post(url, "/v1/chat/completions", {"model": MODEL, "messages": [
        {"role": "user", "content": text}]}), 400, "messages")
    assert error["code"] == "context_length_exceeded"
    assert calls == []
    assert_counts_add_up(url)


def test_tokenizing_leaves_the_event_loop_free(server, monkeypatch):
    url, _ = server
    gate, entered = threading.Event(), threading.Event()
    original = DiffusionGemmaTokenizer.__call__

    def slow(self, text, *args, **kwargs):
        if "SLOW" in str(text):
            entered.set()
            gate.wait(WAIT_SECONDS)
        return original(self, text, *args, **kwargs)

    # The server before the fix tokenized with `encode`, on the event loop.
    monkeypatch.setattr(DiffusionGemmaTokenizer, "__call__", slow)
    monkeypatch.setattr(DiffusionGemmaTokenizer, "encode", lambda self, text, **kwargs: slow(self, text)["input_ids"])
    answers = []
    for endpoint, body in (("/v1/completions", {"prompt": "SLOW"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "SLOW"}]})):
        entered.clear()
        gate.clear()
        request = threading.Thread(target=lambda endpoint=endpoint, body=body: answers.append(post(url, endpoint, {
            "model": MODEL, "max_tokens": 8, **FAST, **body})))
        request.start()
        try:
            assert entered.wait(WAIT_SECONDS)
            assert httpx.get(f"{url}/health", timeout=2).status_code == 200
        finally:
            gate.set()
            request.join(WAIT_SECONDS)
    assert [answer.status_code for answer in answers] == [200, 200]
    assert_counts_add_up(url)


# 2. Upper bounds on the work one request may ask.

def test_denoising_steps_and_length_have_upper_bounds(server, tiny):
    url, _ = server
    model, processor = tiny
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 8}
    for steps in (10 ** 9, 4 * 48 + 1):
        error = refused(post(url, "/v1/completions", {**body, "max_denoising_steps": steps}), 400,
                        "max_denoising_steps")
        assert "192" in error["message"]
    refused(post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_completion_tokens": 10 ** 9}), 400,
            "max_completion_tokens")
    assert post(url, "/v1/completions", {**body, "max_denoising_steps": 4}).status_code == 200
    with pytest.raises(ValueError, match="max_denoising_steps_limit"):
        create_app(model, processor, MODEL, max_denoising_steps_limit=47)  # below the checkpoint's 48
    assert_counts_add_up(url)


# 3. Abandoned requests leave the queue.

def test_a_queued_client_that_leaves_frees_its_place(tiny):
    model, processor = tiny
    app = create_app(model, processor, MODEL, max_batch=1, max_queue=1,
                     max_denoising_steps_limit=ENDLESS["max_denoising_steps"])
    request = {"model": MODEL, "prompt": "hi", "stream": True, **ENDLESS}
    with running(app) as url, httpx.Client(base_url=url, timeout=WAIT_SECONDS) as http:
        with http.stream("POST", "/v1/completions", json=request) as first:
            assert first.status_code == 200
            wait_for(lambda: metrics(url)["active_batch_size"] == 1, "the first request to run")
            with http.stream("POST", "/v1/completions", json=request) as second:
                assert second.status_code == 200
                wait_for(lambda: metrics(url)["queue_depth"] == 1, "the second request to wait")
            # Its client is gone while the first still runs: the queue is empty at once, not when a slot frees.
            wait_for(lambda: metrics(url)["queue_depth"] == 0, "the abandoned request to leave the queue")
            assert metrics(url)['requests_finished_total{outcome="cancelled"}'] == 1
            assert metrics(url)["active_batch_size"] == 1
            with http.stream("POST", "/v1/completions", json=request) as third:
                assert third.status_code == 200  # queued, not 429
                wait_for(lambda: metrics(url)["queue_depth"] == 1, "the third request to wait")
        wait_for(lambda: metrics(url)["active_batch_size"] + metrics(url)["queue_depth"] == 0, "an idle server")
        assert_counts_add_up(url)


# 4. Text that is not text, numbers that are not numbers.

@pytest.mark.parametrize("endpoint, content, param", [
    ("/v1/completions", b'{"model": "tiny-random", "prompt": "a\\ud800"}', "prompt"),
    ("/v1/chat/completions", b'{"model": "tiny-random", "messages": [{"role": "user", "content": "a\\udfff"}]}',
     "messages"),
    ("/v1/completions", b'{"model": "tiny-random", "prompt": "a", "stop": ["\\ud800"]}', "stop"),
    ("/v1/completions", b'{"model": "tiny-random", "prompt": "a", "entropy_bound": 1e400}', "entropy_bound"),
])
def test_text_and_numbers_that_json_carries_but_python_cannot_use(server, endpoint, content, param):
    url, _ = server
    refused(post(url, endpoint, content), 400, param)
    assert_counts_add_up(url)


# 5. Sampler values where sampling is defined.

@pytest.mark.parametrize("settings, param", [
    ({"t_min": 0, "t_max": 1e-40}, "t_min"),
    ({"t_max": 1e300}, "t_max"),
    ({"temperature": 1e-6}, "temperature"),
    ({"t_min": 0.001, "t_max": 0.002}, "t_min"),
    ({"confidence_threshold": -1}, "confidence_threshold"),
])
def test_sampler_values_out_of_range(server, settings, param):
    url, _ = server
    refused(post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 8, **FAST, **settings}),
            400, param)
    assert_counts_add_up(url)


def test_sampler_values_at_the_edges_of_the_range(server):
    url, _ = server
    answer = post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 8, **FAST, "t_min": 0.02,
                                           "t_max": 50, "temperature": 2})
    assert answer.status_code == 200, answer.text


# 6. Every field honoured or refused.

@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("presence_penalty", "x"), ("frequency_penalty", -3), ("repetition_penalty", 0),
    ("top_k", 2.5), ("top_k", -2), ("min_p", 1.5), ("min_tokens", -1), ("min_tokens", 100), ("ignore_eos", "yes"),
    ("stop_token_ids", [-3]), ("stop_token_ids", 3),
    ("tool_choice", "required"), ("tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("function_call", {"name": "f"}), ("parallel_tool_calls", "x"), ("reasoning_effort", "low"),
    ("modalities", ["text", "audio"]), ("prediction", {"type": "content", "content": "x"}), ("top_p", 0),
    ("n", 1000), ("n", 1.5), ("logprobs", 1), ("top_logprobs", 3), ("tools", [{"type": "function"}]), ("store", True),
    ("audio", {"voice": "x"}), ("no_such_field", 1), ("user", 5), ("response_format", {"type": "json_object"}),
    ("include_stop_str_in_output", "yes"), ("add_generation_prompt", 1), ("chat_template", "{{ messages }}"),
])
def test_chat_fields_it_cannot_honour_are_refused(server, field, value):
    url, _ = server
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **FAST, field: value}
    refused(post(url, "/v1/chat/completions", body), 400, field)
    assert_counts_add_up(url)


@pytest.mark.parametrize("field, value", [
    ("best_of", 2), ("echo", True), ("suffix", "x"), ("logprobs", True), ("messages", []), ("chat_template", "x"),
    ("tools", []),
])
def test_completion_fields_it_cannot_honour_are_refused(server, field, value):
    url, _ = server
    refused(post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", field: value}), 400, field)


def test_n_answers_count_as_n_requests(server):
    url, _ = server
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "n": 3, **FAST}
    answer = post(url, "/v1/chat/completions", body)
    assert answer.status_code == 200 and len(answer.json()["choices"]) == 3
    assert_counts_add_up(url)


def test_fields_at_values_that_change_nothing_are_accepted(server):
    url, _ = server
    api = client(url)
    settings = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=16, seed=4, extra_body=FAST)
    plain = api.chat.completions.create(**settings).choices[0].message.content
    no_ops = dict(n=1, top_p=1, presence_penalty=0, frequency_penalty=0.0, logprobs=False, tool_choice="none",
                  parallel_tool_calls=False, store=False, user="someone", metadata={"k": "v"},
                  response_format={"type": "text"}, service_tier="auto", logit_bias={})
    extra = {**FAST, "top_k": -1, "min_p": 0, "repetition_penalty": 1, "ignore_eos": False, "stop_token_ids": []}
    answer = api.chat.completions.create(**{**settings, **no_ops, "extra_body": extra})
    assert answer.choices[0].message.content == plain


def test_model_must_be_the_served_one(server):
    url, _ = server
    api = client(url)
    with pytest.raises(openai.NotFoundError) as caught:
        api.completions.create(model="gpt-4", prompt="hi", max_tokens=4)
    assert caught.value.body["code"] == "model_not_found"
    refused(post(url, "/v1/completions", {"prompt": "hi"}), 400, "model")
    refused(post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}), 400, "model")
    assert_counts_add_up(url)


def test_max_completion_tokens_on_completions(server):
    url, _ = server
    answer = client(url).completions.create(model=MODEL, prompt="hi", seed=1, extra_body={
        "max_completion_tokens": 3, **FAST})
    assert answer.usage.completion_tokens <= 3
    refused(post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3,
                                          "max_completion_tokens": 4}), 400, "max_tokens")


def test_include_stop_str_in_output(server):
    url, _ = server
    api = client(url)
    settings = dict(model=MODEL, prompt="abc", max_tokens=64, seed=2, extra_body=FAST)
    full = api.completions.create(**settings).choices[0].text
    stop = full[3:5]
    cut = full[:full.index(stop)]
    kept = api.completions.create(**{**settings, "stop": stop, "extra_body": {
        **FAST, "include_stop_str_in_output": True}})
    assert kept.choices[0].text == cut + stop and kept.choices[0].finish_reason == "stop"
    streamed = api.completions.create(**{**settings, "stop": stop, "stream": True, "extra_body": {
        **FAST, "include_stop_str_in_output": True}})
    assert "".join(chunk.choices[0].text for chunk in streamed) == cut + stop
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "abc"}], max_tokens=64, seed=2)
    text = api.chat.completions.create(**chat, extra_body=FAST).choices[0].message.content
    stop = text[2:4]
    answer = api.chat.completions.create(**chat, stop=stop, extra_body={**FAST, "include_stop_str_in_output": True})
    assert answer.choices[0].message.content == text[:text.index(stop)] + stop


def tokens(url, body):
    response = post(url, "/tokenize", body)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def test_chat_template_fields(server, tiny):
    url, _ = server
    _, processor = tiny
    messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi th"}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=False)
    # The template writes the answer, then closes its turn; continuing the answer leaves the turn open.
    assert rendered.endswith("Hi th<end_of_turn>\n")
    bos = [processor.tokenizer.bos_token_id]
    assert tokens(url, {"messages": messages, "continue_final_message": True}) == \
        processor.tokenizer(rendered[:rendered.rindex("Hi th") + 5], add_special_tokens=False)["input_ids"]
    assert tokens(url, {"messages": messages, "add_generation_prompt": False}) == \
        processor.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert tokens(url, {"messages": messages[:1]}) == \
        processor.tokenizer(processor.apply_chat_template(messages[:1], add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]
    assert tokens(url, {"messages": messages})[:1] == bos
    refused(post(url, "/tokenize", {"messages": messages, "continue_final_message": True,
                                    "add_generation_prompt": True}), 400, "continue_final_message")
    refused(post(url, "/v1/chat/completions", {"model": MODEL, "messages": messages, "chat_template": "{{ 1 }}"}),
            400, "chat_template")
    answer = client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=8, extra_body={
        **FAST, "continue_final_message": True, "add_generation_prompt": False})
    assert answer.usage.prompt_tokens == len(tokens(url, {"messages": messages, "continue_final_message": True}))


def test_a_request_template_runs_only_where_trusted(tiny):
    model, processor = tiny
    app = create_app(model, processor, MODEL, trust_request_chat_template=True)
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    with running(app) as url:
        assert tokens(url, {"messages": [{"role": "user", "content": "x"}], "chat_template": template}) == \
            processor.tokenizer("[x]")["input_ids"]


def test_tokenize_and_detokenize(server, tiny):
    url, _ = server
    _, processor = tiny
    ids = processor.tokenizer("Hello there")["input_ids"]
    answer = post(url, "/tokenize", {"model": MODEL, "prompt": "Hello there"}).json()
    assert answer == {"count": len(ids), "max_model_len": 2048, "tokens": ids}
    assert tokens(url, {"prompt": "Hello there", "add_special_tokens": False}) == ids[1:]
    assert post(url, "/detokenize", {"tokens": ids}).json() == {"prompt": processor.tokenizer.decode(ids)}
    refused(post(url, "/detokenize", {"tokens": [10 ** 6]}), 400, "tokens")
    refused(post(url, "/tokenize", {"prompt": "x", "messages": []}), 400, "prompt")
    refused(post(url, "/tokenize", {"prompt": "x", "model": "other"}), 404, "model")
    assert post(url, "/tokenize", {"prompt": "x"}, headers={}).status_code == 401


# 7. Connections that stall, and too many of them.

def test_stalled_and_surplus_connections_are_closed(tiny):
    model, processor = tiny
    app = create_app(model, processor, MODEL)
    with running(app, read_timeout=1, max_connections=3) as url:
        with contextlib.ExitStack() as held:
            stalled = held.enter_context(contextlib.closing(connect(url)))
            stalled.sendall(b"GET /health HTTP/1.1\r\nHost: te")  # half a head, then nothing
            idle = held.enter_context(contextlib.closing(connect(url)))
            started = time.monotonic()
            assert stalled.recv(100) == b"" and idle.recv(100) == b""
            assert time.monotonic() - started < 5
            for _ in range(3):
                held.enter_context(contextlib.closing(connect(url)))
            surplus = held.enter_context(contextlib.closing(connect(url)))
            started = time.monotonic()
            assert surplus.recv(100) == b""
            assert time.monotonic() - started < 0.9  # closed at once, not when its head is late
        with contextlib.closing(connect(url)) as sock:
            sock.sendall(b"HEAD /health HTTP/1.1\r\nHost: test\r\n\r\n")
            assert status_line(sock) == b"HTTP/1.1 200 OK"


# 8. Keys, probes, logs, versions and shutdown.

def test_api_key_checks(server):
    url, _ = server
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, **FAST}
    assert post(url, "/v1/completions", body, headers={"Authorization": f"bearer  {API_KEY}"}).status_code == 200
    for header in (f"Basic {API_KEY}", f"Bearer {API_KEY}x", "Bearer", API_KEY):
        assert post(url, "/v1/completions", body, headers={"Authorization": header}).status_code == 401
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert_counts_add_up(url)


def test_probes_and_version(server):
    url, _ = server
    assert httpx.head(f"{url}/health").status_code == 200
    version = httpx.get(f"{url}/version").json()["version"]
    assert isinstance(version, str) and version


def test_serve_flags_reach_the_server(monkeypatch, checkpoint):
    seen = {}
    monkeypatch.setattr(server_module, "serve", lambda path, **settings: seen.update(settings, path=path))
    monkeypatch.setenv("DIFFUSIONGEMMA_API_KEY", "from-the-environment")
    assert main(["serve", checkpoint, "--max-body-bytes", "1000", "--max-denoising-steps-limit", "64",
                 "--read-timeout", "2.5", "--keep-alive-timeout", "1", "--max-connections", "9",
                 "--shutdown-timeout", "3", "--log-level", "debug", "--trust-request-chat-template",
                 "--allowed-media-domains", "images.example", "cdn.example"]) == 0
    assert seen["allowed_media_domains"] == ("images.example", "cdn.example")
    assert seen["api_key"] == "from-the-environment" and seen["model_name"] == os.path.basename(checkpoint)
    assert (seen["max_body_bytes"], seen["max_denoising_steps_limit"], seen["read_timeout"],
            seen["keep_alive_timeout"], seen["max_connections"], seen["shutdown_timeout"], seen["log_level"],
            seen["trust_request_chat_template"]) == (1000, 64, 2.5, 1.0, 9, 3.0, "debug", True)
    assert main(["serve", checkpoint, "--served-model-name", "mine", "--api-key", "flag"]) == 0
    assert (seen["model_name"], seen["api_key"]) == ("mine", "flag")


def test_engine_failures_reach_the_log_not_the_client(server, monkeypatch):
    url, _ = server
    monkeypatch.setattr(server_module, "resolve_settings", lambda *args, **kwargs: 1 / 0)
    with server_log() as records:
        response = post(url, "/v1/completions", {"model": MODEL, "prompt": "hi"})
    error = refused(response, 500, None)
    assert "division" not in error["message"] and error["type"] == "server_error"
    request_id = error["message"].split("its id, ")[1].split(",")[0]
    assert any(request_id in record.getMessage() and record.exc_info for record in records)
    assert_counts_add_up(url)


def test_shutdown_ends_the_answers_in_flight_with_word_why(tiny):
    model, processor = tiny
    app = create_app(model, processor, MODEL, max_denoising_steps_limit=ENDLESS["max_denoising_steps"])
    server = http_server(app, log_level="warning", shutdown_timeout=1)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    wait_for(lambda: server.started, "the server to start")
    request = {"model": MODEL, "prompt": "hi", **ENDLESS}
    answers = {}

    def streamed():
        with httpx.stream("POST", f"{url}/v1/completions", json={**request, "stream": True},
                          timeout=WAIT_SECONDS) as response:
            answers["stream"] = [line for line in response.iter_lines() if line]

    def whole():
        answers["whole"] = httpx.post(f"{url}/v1/completions", json=request, timeout=WAIT_SECONDS)

    clients = [threading.Thread(target=streamed), threading.Thread(target=whole)]
    for one in clients:
        one.start()
    try:
        wait_for(lambda: app.state.scheduler.batch_size == 2, "both requests to run")
        started = time.monotonic()
        server.should_exit = True
        for one in clients:
            one.join(WAIT_SECONDS)
        thread.join(WAIT_SECONDS)
        assert time.monotonic() - started < 1 + SHUTDOWN_GRACE_SECONDS
    finally:
        server.should_exit = True
        thread.join(WAIT_SECONDS)
        sock.close()
    assert not thread.is_alive() and not app.state.scheduler.alive
    *_, error, done = answers["stream"]
    assert done == "data: [DONE]"
    assert json.loads(error.removeprefix("data: "))["error"]["code"] == "server_shutting_down"
    assert answers["whole"].status_code == 503
    assert answers["whole"].json()["error"]["code"] == "server_shutting_down"

