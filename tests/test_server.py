"""The OpenAI-compatible server, driven by the official `openai` client against a tiny random model.

Every server here runs in a background thread on 127.0.0.1, on a socket the test bound to a free port,
and is stopped (worker thread included) before its fixture returns.
"""

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from diffusiongemma.engine.runner import RequestsRunner
from diffusiongemma.kernels.experts import grouped_linear, row_independent
from diffusiongemma.model.cache import KVCache
from diffusiongemma.serving import scheduler as engine
from diffusiongemma.serving import server as server_module
from diffusiongemma.serving.server import create_app, http_server

API_KEY = "test-key"
MODEL = "tiny-random"
# Few steps and short answers keep each request to a few dozen milliseconds on one CPU core.
FAST = {"max_denoising_steps": 4}
WAIT_SECONDS = 20
# A canvas that never settles: many steps, and a confidence no random model reaches.
ENDLESS = {"max_tokens": 16, "max_denoising_steps": 100000, "confidence_threshold": 1e-12}


@contextlib.contextmanager
def running(app, **settings):
    """Serves `app` from a thread, with `http_server`'s `settings`; yields its base URL and stops it, worker
    included, on the way out."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = http_server(app, log_level="warning", **settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(WAIT_SECONDS)
        sock.close()
        assert not thread.is_alive(), "the server thread did not stop"
        assert not app.state.scheduler.alive, "the scheduler thread did not stop"


@pytest.fixture(scope="module")
def server(tiny):
    model, processor = tiny
    app = create_app(model, processor, MODEL, max_batch=4, max_queue=32, max_prompt_tokens=200, api_key=API_KEY,
                     max_denoising_steps_limit=ENDLESS["max_denoising_steps"])
    with running(app) as url:
        yield url, app


def client(url, key=API_KEY, cls=openai.OpenAI):
    # No retries: a 429 or 500 must reach the test, not be retried away.
    return cls(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=WAIT_SECONDS)


def chat_ids(processor, text):
    ids = processor.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=True, return_tensors="pt")
    return ids[0].tolist()


def expected(model, processor, ids, seed, max_tokens, steps=FAST["max_denoising_steps"], **settings):
    """(text, completion tokens, finish reason) that `generate` gives after `torch.manual_seed(seed)`, with the
    server's numbers (`batch_invariant`, the prompt in the server's chunks)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, max_denoising_steps=steps,
                             batch_invariant=True, prefill_chunk_size=engine.PREFILL_CHUNK, **settings)
    eos = set(model.generation_config.eos_token_id)
    generated = out.sequences[0, len(ids):].tolist()
    end = next((i for i, token in enumerate(generated) if token in eos), None)
    kept = (generated if end is None else generated[:end + 1])[:max_tokens]
    reason = "stop" if any(token in eos for token in kept) else "length"
    return processor.decode(kept, skip_special_tokens=True), len(kept), reason


def metric(url, name):
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"diffusiongemma_{name} "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


@contextlib.contextmanager
def server_log():
    """Yields the list the server's log records go to while the block runs."""
    records, handler, logger = [], logging.Handler(), logging.getLogger(server_module.__name__)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def wait_for(condition, what):
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_models_health_and_metrics(server):
    url, _ = server
    assert [m.id for m in client(url).models.list().data] == [MODEL]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{url}/metrics").text
    for name in ("requests_received_total", "queue_depth", "active_batch_size", "generated_tokens_total",
                 "tokens_per_forward", "denoising_steps_per_canvas_count"):
        assert f"diffusiongemma_{name}" in text


def test_chat_matches_generate_and_seed_reproduces(server, tiny):
    url, _ = server
    model, processor = tiny
    ids = chat_ids(processor, "Why is the sky blue?")
    text, tokens, reason = expected(model, processor, ids, seed=5, max_tokens=40)
    answers = [client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content":
                                                                           "Why is the sky blue?"}],
                                                   max_tokens=40, seed=5, extra_body=FAST) for _ in range(2)]
    for answer in answers:
        assert answer.object == "chat.completion" and answer.model == MODEL
        assert answer.choices[0].message.role == "assistant"
        assert answer.choices[0].message.content == text
        assert answer.choices[0].finish_reason == reason
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), tokens)
        assert answer.usage.total_tokens == len(ids) + tokens


def test_completion_streamed_equals_whole(server, tiny):
    url, _ = server
    model, processor = tiny
    api = client(url)
    settings = dict(model=MODEL, prompt="Once upon a time", max_tokens=48, seed=11, extra_body=FAST)
    whole = api.completions.create(**settings)
    ids = processor.tokenizer.encode("Once upon a time")
    assert (whole.choices[0].text, whole.usage.completion_tokens, whole.choices[0].finish_reason) == \
        expected(model, processor, ids, seed=11, max_tokens=48)
    chunks = list(api.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    drafted = list(api.completions.create(**settings, stream=True, stream_options={"include_drafts": True}))
    assert "".join(c.choices[0].text for c in drafted) == whole.choices[0].text
    assert any(c.choices[0].model_extra.get("draft") is not None for c in drafted)


def test_chat_stream_with_drafts(server):
    url, _ = server
    api = client(url)
    settings = dict(model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                    max_completion_tokens=40, seed=3, extra_body=FAST)
    whole = api.chat.completions.create(**settings).choices[0].message.content
    plain = list(api.chat.completions.create(**settings, stream=True))
    drafted = list(api.chat.completions.create(**settings, stream=True,
                                               stream_options={"include_usage": False, "include_drafts": True}))
    for chunks in (plain, drafted):
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert not any((c.choices[0].delta.model_extra or {}).get("draft") is not None for c in plain)
    drafts = [c.choices[0].delta.model_extra["draft"] for c in drafted
              if (c.choices[0].delta.model_extra or {}).get("draft") is not None]
    # One draft per denoising step, each the text of one canvas.
    assert 1 <= len(drafts) <= 3 * FAST["max_denoising_steps"]
    assert all(isinstance(d, str) for d in drafts)


def test_stop_string_and_temperature_zero(server):
    url, _ = server
    api = client(url)
    settings = dict(model=MODEL, prompt="abc", max_tokens=64, seed=2, extra_body=FAST)
    full = api.completions.create(**settings).choices[0].text
    assert len(full) > 4
    stop = full[2:4]
    cut = api.completions.create(**settings, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(api.completions.create(**settings, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    greedy = [api.completions.create(**settings, temperature=0).choices[0].text for _ in range(2)]
    assert greedy[0] == greedy[1]


def test_batched_requests_answer_as_alone(server):
    url, _ = server
    seeded = [dict(prompt=f"question {i}", seed=100 + i, max_tokens=24 + 8 * i) for i in range(3)]
    api = client(url)
    alone = [api.completions.create(model=MODEL, extra_body=FAST, **s).choices[0].text for s in seeded]

    async def together():
        async_api = client(url, cls=openai.AsyncOpenAI)
        others = [dict(prompt="noise " * (i + 1), max_tokens=64, extra_body={"max_denoising_steps": 6})
                  for i in range(5)]
        answers = await asyncio.gather(*(async_api.completions.create(model=MODEL, **{"extra_body": FAST, **s})
                                         for s in [*others[:3], *seeded, *others[3:]]))
        await async_api.close()
        return [a.choices[0].text for a in answers[3:6]]

    assert asyncio.run(together()) == alone


def test_batched_decoder_pass_equals_each_request_alone(tiny):
    """The pass the scheduler runs (`RequestsRunner`): every row over its own cache, bit for bit what that
    row gets alone, with prefixes of different lengths (some past the sliding window) and rows on their
    first step (no self-conditioning signal) beside rows that have one."""
    model, _ = tiny
    config, generator = model.config, torch.Generator().manual_seed(0)
    length, vocab = config.canvas_length, config.text_config.vocab_size
    runner = RequestsRunner(model, soft_capped=True)
    caches, canvases, signals = [], [], []
    with torch.inference_mode():
        for prefix in (3, 20, 45, 90, 7):
            caches.append(runner.new_cache())
            runner.encode(caches[-1], torch.randint(0, vocab, (1, prefix), generator=generator))
            canvases.append(torch.randint(0, vocab, (1, length), generator=generator))
            signals.append(None if prefix in (20, 7) else 4 * torch.randn(1, length, vocab, generator=generator))
        alone = [runner.decode([cache], canvas, [signal]) for cache, canvas, signal in zip(caches, canvases, signals)]
        together = runner.decode(caches, torch.cat(canvases), signals)
        for row, scores in enumerate(alone):
            assert torch.equal(together.rows(row, row + 1), scores.rows(0, 1)), f"row {row} differs from it alone"


def test_row_independent_experts_give_each_row_its_own_bits():
    """In tiles, an expert's product for a row does not depend on how many other rows that expert gets (with
    `F.grouped_mm` it does, at these shapes), and stays within rounding of the reference's grouped product."""
    generator = torch.Generator().manual_seed(0)
    experts, width = 8, 192
    weight = torch.randn(experts, width, width, generator=generator)
    few = torch.randn(experts * 4, width, generator=generator)
    others = torch.randn(experts * 60, width, generator=generator)
    # Each expert's four rows alone, then the same four rows first among 64.
    crowd = torch.cat([torch.cat([few[4 * e:4 * e + 4], others[60 * e:60 * e + 60]]) for e in range(experts)])
    few_ends = torch.arange(1, experts + 1, dtype=torch.int32) * 4
    crowd_ends = torch.arange(1, experts + 1, dtype=torch.int32) * 64
    with row_independent():
        alone, together = grouped_linear(few, weight, few_ends), grouped_linear(crowd, weight, crowd_ends)
    for e in range(experts):
        assert torch.equal(together[64 * e:64 * e + 4], alone[4 * e:4 * e + 4]), f"expert {e}"
    torch.testing.assert_close(alone, grouped_linear(few, weight, few_ends), rtol=1e-4, atol=1e-4)


def live_requests() -> int:
    """Caches and running requests still reachable: what a scheduler holds between requests."""
    gc.collect()
    return sum(type(thing) in (KVCache, engine._Running) for thing in gc.get_objects())


def test_sixty_four_concurrent_streams(tiny):
    """A bounded load test: 64 streams at once, more than the batch takes, with settings that make them
    join and leave at different steps. Each must get exactly its own `generate` answer, and the server
    must go back to idle."""
    model, processor = tiny
    count = 64
    requests = [dict(prompt=f"load test {i}" + " more" * (i % 5), seed=i, max_tokens=(8, 16, 24, 40)[i % 4],
                     steps=2 + i % 4, entropy_bound=(0.1, 0.5, 2.0)[i % 3]) for i in range(count)]
    wanted = [expected(model, processor, chat_ids(processor, r["prompt"]), seed=r["seed"], max_tokens=r["max_tokens"],
                       steps=r["steps"], sampler_config={"entropy_bound": r["entropy_bound"]}) for r in requests]

    async def one(api, r):
        stream = await api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": r["prompt"]}], max_tokens=r["max_tokens"],
            seed=r["seed"], stream=True, stream_options={"include_usage": True},
            extra_body={"max_denoising_steps": r["steps"], "entropy_bound": r["entropy_bound"]})
        parts, reasons, usage = [], [], None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                reasons.append(chunk.choices[0].finish_reason)
            usage = chunk.usage or usage
        return "".join(parts), usage.completion_tokens, reasons[-1]

    async def all_of_them(url):
        api = client(url, cls=openai.AsyncOpenAI)
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(api, r) for r in requests)), WAIT_SECONDS * 3)
        finally:
            await api.close()

    idle = live_requests()
    app = create_app(model, processor, MODEL, max_batch=16, max_queue=count)
    with running(app) as url:
        assert asyncio.run(all_of_them(url)) == wanted
        wait_for(lambda: metric(url, "active_batch_size") == 0, "an idle scheduler")
        assert metric(url, "queue_depth") == 0 and metric(url, "step_batch_size") == 0
        finished = [metric(url, f'requests_finished_total{{outcome="{k}"}}') for k in ("stop", "length")]
        assert sum(finished) == count
        assert metric(url, 'requests_finished_total{outcome="error"}') == 0
        # Batched for real: fewer decoder passes than request steps, never more rows than the batch takes.
        passes, steps = metric(url, "batched_steps_total"), metric(url, "decoder_forwards_total")
        assert passes < steps <= 16 * passes
    assert live_requests() == idle


def test_api_key(server):
    url, _ = server
    with pytest.raises(openai.AuthenticationError) as caught:
        client(url, key="wrong").models.list()
    assert caught.value.status_code == 401
    response = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "temperature": 3}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "entropy_bound": -1}, "entropy_bound"),
    ({"prompt": "hi", "max_denoising_steps": 2.5}, "max_denoising_steps"),
    ({"prompt": "hi", "t_min": 0.9, "t_max": 0.5}, "t_max"),
    ({"prompt": "hi", "seed": "x"}, "seed"),
    ({"prompt": "hi", "seed": 2 ** 64}, "seed"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": "hi", "stream_options": {"include_drafts": True}}, "stream_options"),
    ({"prompt": "hi", "logprobs": 6}, "logprobs"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": "word " * 300}, "prompt"),
    ({"prompt": "hi", "max_tokens": 5000}, "max_tokens"),
])
def test_bad_completion_requests(server, body, param):
    url, _ = server
    response = httpx.post(f"{url}/v1/completions", json={"model": MODEL, **body},
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}], "t_min": NaN}', "not valid JSON"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_denoising_steps": 4,
                 "stability_threshold": 10 ** 9}).encode(), "stability_threshold"),
    (json.dumps({"model": MODEL, "messages": []}).encode(), "messages"),
    (json.dumps({"model": MODEL, "messages": [{"content": "no role"}]}).encode(), "role"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                            "image_url": {"url": "x"}}]}]})
     .encode(), "an image must be a data: URL"),
    (json.dumps({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}).encode(), "chat template"),
])
def test_bad_chat_requests(server, content, message):
    url, _ = server
    response = httpx.post(f"{url}/v1/chat/completions", content=content,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_openai_client_sees_400(server):
    url, _ = server
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            extra_body={"entropy_bound": 0})
    assert caught.value.body["param"] == "entropy_bound"


def test_full_queue_gets_429_and_disconnects_cancel(tiny):
    model, processor = tiny
    app = create_app(model, processor, MODEL, max_batch=1, max_queue=1,
                     max_denoising_steps_limit=ENDLESS["max_denoising_steps"])
    with running(app) as url, httpx.Client(base_url=url, timeout=WAIT_SECONDS) as http:
        request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, **ENDLESS}
        with contextlib.ExitStack() as streams:
            first = streams.enter_context(http.stream("POST", "/v1/chat/completions", json=request))
            assert first.status_code == 200
            wait_for(lambda: metric(url, "active_batch_size") == 1, "the first request to run")
            second = streams.enter_context(http.stream("POST", "/v1/chat/completions", json=request))
            assert second.status_code == 200
            wait_for(lambda: metric(url, "queue_depth") == 1, "the second request to wait")
            refused = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "queue_full"
            assert "429" in httpx.get(f"{url}/metrics").text
        # Both clients are gone: the running request stops and the waiting one never starts.
        wait_for(lambda: metric(url, 'requests_finished_total{outcome="cancelled"}') == 2, "two cancellations")
        assert metric(url, "active_batch_size") == 0 and metric(url, "queue_depth") == 0
        # A client that gives up on a whole (not streamed) answer cancels it too.
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/chat/completions", json={**request, "stream": False}, timeout=1.0)
        wait_for(lambda: metric(url, 'requests_finished_total{outcome="cancelled"}') == 3, "a third cancellation")
        answer = client(url).completions.create(model=MODEL, prompt="after", max_tokens=8, extra_body=FAST)
        assert answer.choices[0].finish_reason in ("stop", "length")


def test_sampling_filters_are_honoured_alone_and_in_a_batch(server):
    """top_k, top_p and min_p narrow what each position samples from (`test_sampler` checks how): they change
    a seeded answer, which stays the same alone and beside requests with other filters or none."""
    url, _ = server
    api = client(url)
    # A bound this high accepts every position, so that what is sampled shows in the answer.
    every = {**FAST, "entropy_bound": 50.0}
    filtered = [dict(top_p=0.5, extra_body={**every, "top_k": 8, "min_p": 0.05}), dict(top_p=0.3, extra_body=every),
                dict(extra_body={**every, "min_p": 0.2})]
    ask = dict(model=MODEL, prompt="a filtered question", max_tokens=24, seed=9)
    alone = [api.completions.create(**ask, **f).choices[0].text for f in filtered]
    plain = api.completions.create(**ask, extra_body=every).choices[0].text
    assert len({plain, *alone}) == 4

    async def together():
        async_api = client(url, cls=openai.AsyncOpenAI)
        answers = await asyncio.gather(*(async_api.completions.create(**ask, **f)
                                         for f in [filtered[0], {"extra_body": every}, *filtered[1:]]))
        await async_api.close()
        return [a.choices[0].text for i, a in enumerate(answers) if i != 1]

    assert asyncio.run(together()) == alone


def test_stop_token_ids_min_tokens_and_ignore_eos(server, tiny):
    """`stop_token_ids` end the answer as an end-of-sequence token does; `min_tokens` keeps every ending
    token out of the answer's first tokens; `ignore_eos` lets the answer run past end-of-sequence tokens."""
    url, _ = server
    model, processor = tiny
    ids = processor.tokenizer.encode("where does it end")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, max_denoising_steps=4, batch_invariant=True,
                             prefill_chunk_size=engine.PREFILL_CHUNK, eos_token_id=[0])
    special = set(processor.tokenizer.all_special_ids)
    answer = out.sequences[0, len(ids):].tolist()
    # The first ordinary token at the third place or later, and where it first shows.
    stop_at = next(i for i in range(2, len(answer)) if answer[i] not in special)
    token = answer[stop_at]
    stop_at = answer.index(token)
    api = client(url)
    ask = dict(model=MODEL, prompt="where does it end", max_tokens=24, seed=3, extra_body={**FAST, "ignore_eos": True})
    plain = api.completions.create(**ask)
    assert plain.usage.completion_tokens == 24 and plain.choices[0].finish_reason == "length"
    stopped = api.completions.create(**{**ask, "extra_body": {**ask["extra_body"], "stop_token_ids": [token]}})
    assert stopped.usage.completion_tokens == stop_at + 1 and stopped.choices[0].finish_reason == "stop"
    late = api.completions.create(**{**ask, "extra_body": {**ask["extra_body"], "stop_token_ids": [token],
                                                           "min_tokens": stop_at + 1}})
    assert late.usage.completion_tokens > stop_at + 1
    settings = engine.resolve_settings(model, 3, ignore_eos=True, stop_token_ids=(7,))
    assert engine._Running(engine.Request([1, 2, 3], settings, print), RequestsRunner(model, True), model,
                           processor.tokenizer, {1, 106}).eos == {7}


def test_penalties_by_hand(tiny):
    model, _ = tiny
    settings = engine.resolve_settings(model, 3, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    penalties = engine.Penalties(settings, prompt_ids=[4], answered=lambda: [1, 1, 2])
    scores = torch.tensor([[[1.0, 2.0, -2.0, 3.0, 4.0, -1.0]]])
    # Token 1: twice in the answer; 2: once; 4: in the prompt; 0, 3 and 5: nowhere.
    expected = torch.tensor([[[1.0, (2.0 - 0.5 - 0.5) / 2, (-2.0 - 0.25 - 0.5) * 2, 3.0, 4.0 / 2, -1.0]]])
    torch.testing.assert_close(penalties(None, scores), expected)
    with pytest.raises(ValueError, match="presence_penalty"):
        engine.resolve_settings(model, 3, presence_penalty=3)


def test_penalties_change_later_canvases_alone_and_in_a_batch(server):
    url, _ = server
    api = client(url)
    every = {**FAST, "entropy_bound": 50.0}
    ask = dict(model=MODEL, prompt="say it again", max_tokens=48, seed=5)
    plain = api.completions.create(**ask, extra_body=every).choices[0].text
    penalised = [dict(frequency_penalty=2.0, extra_body=every), dict(extra_body={**every, "repetition_penalty": 3.0})]
    alone = [api.completions.create(**ask, **p).choices[0].text for p in penalised]
    assert plain not in alone

    async def together():
        async_api = client(url, cls=openai.AsyncOpenAI)
        answers = await asyncio.gather(*(async_api.completions.create(**ask, **p)
                                         for p in [penalised[0], {"extra_body": every}, penalised[1]]))
        await async_api.close()
        return [answers[0].choices[0].text, answers[2].choices[0].text]

    assert asyncio.run(together()) == alone


def test_n_answers_are_the_answers_of_seeds_in_a_row(server):
    """`n` answers are the ones `seed`, `seed + 1`, ... give alone, whole or streamed, with the prompt's tokens
    counted once and every answer's tokens added up."""
    url, _ = server
    api = client(url)
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "three ways"}], max_tokens=16, extra_body=FAST)
    alone = [api.chat.completions.create(**ask, seed=7 + i) for i in range(3)]
    both = api.chat.completions.create(**ask, seed=7, n=3)
    assert [c.index for c in both.choices] == [0, 1, 2]
    assert [c.message.content for c in both.choices] == [a.choices[0].message.content for a in alone]
    assert both.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert both.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    texts, reasons = ["", ""], [None, None]
    for chunk in api.chat.completions.create(**ask, seed=7, n=2, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [a.choices[0].message.content for a in alone[:2]] and None not in reasons
    completions = api.completions.create(model=MODEL, prompt="three ways", max_tokens=16, seed=7, n=2, extra_body=FAST)
    assert len({c.text for c in completions.choices}) == 2


def test_logprobs_of_the_committed_tokens(server, tiny):
    """Each answer token comes with its log-probability under the distribution its canvas's last step
    computed, where it is the most likely token: so it leads its own top list. Whole answers only."""
    url, _ = server
    _, processor = tiny
    api = client(url)
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "how sure"}], max_tokens=16, seed=2, extra_body=FAST)
    plain = api.chat.completions.create(**ask)
    answer = api.chat.completions.create(**ask, logprobs=True, top_logprobs=3)
    assert answer.choices[0].message.content == plain.choices[0].message.content
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == entry.logprob
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    completion = api.completions.create(model=MODEL, prompt="how sure", max_tokens=16, seed=2, logprobs=2,
                                        extra_body=FAST)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == completion.usage.completion_tokens
    assert "".join(logprobs.tokens).startswith(completion.choices[0].text[:1])
    with pytest.raises(openai.BadRequestError, match="stream"):
        api.chat.completions.create(**ask, logprobs=True, stream=True)


def image_url(color, size=(40, 30)) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_images_as_data_urls(server, tiny):
    """An `image_url` part with a data: URL reaches the vision tower: the answer is `generate`'s on the
    processor's inputs for the same messages (the prompt encoded in one piece), alone and beside others;
    another image gives another answer. URLs the server may not read, and bad data, get a 400."""
    url, _ = server
    model, processor = tiny
    api = client(url)

    def messages(color):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(color)}},
                                             {"type": "text", "text": "what is this"}]}]

    ask = dict(model=MODEL, max_tokens=16, seed=4, extra_body=FAST)
    red = api.chat.completions.create(messages=messages("red"), **ask)
    inputs = processor.apply_chat_template(messages("red"), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt", padding=False)
    assert red.usage.prompt_tokens == inputs["input_ids"].shape[1] > 20
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        out = model.generate(**{k: v for k, v in inputs.items() if k != "attention_mask"}, max_new_tokens=16,
                             max_denoising_steps=FAST["max_denoising_steps"], batch_invariant=True)
    generated = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    eos = set(model.generation_config.eos_token_id)
    end = next((i for i, token in enumerate(generated) if token in eos), len(generated) - 1)
    assert red.choices[0].message.content == processor.decode(generated[:end + 1][:16], skip_special_tokens=True)
    blue = api.chat.completions.create(messages=messages("blue"), **ask)
    assert blue.choices[0].message.content != red.choices[0].message.content

    async def together():
        async_api = client(url, cls=openai.AsyncOpenAI)
        answers = await asyncio.gather(async_api.completions.create(model=MODEL, prompt="text beside", max_tokens=32,
                                                                    extra_body=FAST),
                                       async_api.chat.completions.create(messages=messages("red"), **ask))
        await async_api.close()
        return answers[1].choices[0].message.content

    assert asyncio.run(together()) == red.choices[0].message.content
    for bad in ("http://images.example/cat.png", "file:///etc/passwd", "data:image/png;base64,bm90IGFuIGltYWdl"):
        body = {"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": bad}}, {"type": "text", "text": "hi"}]}]}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "messages", response.text


def test_image_hosts_must_be_allowed_and_public(tiny):
    model, processor = tiny
    app = create_app(model, processor, MODEL, allowed_media_domains=("localhost",))
    with running(app) as url:
        body = {"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://localhost/cat.png"}}, {"type": "text", "text": "hi"}]}]}
        response = httpx.post(f"{url}/v1/chat/completions", json=body)
        assert response.status_code == 400 and "loopback or private" in response.json()["error"]["message"]


def test_long_request_does_not_block_short_ones(server):
    url, _ = server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    cancelled = metric(url, 'requests_finished_total{outcome="cancelled"}')
    long_request = {"model": MODEL, "prompt": "long", "stream": True, **ENDLESS}
    with httpx.Client(base_url=url, timeout=WAIT_SECONDS, headers=headers) as http:
        with http.stream("POST", "/v1/completions", json=long_request) as stream:
            assert stream.status_code == 200
            wait_for(lambda: metric(url, "active_batch_size") == 1, "the long request to run")
            short = client(url).completions.create(model=MODEL, prompt="short", max_tokens=32, extra_body=FAST)
            assert short.choices[0].finish_reason in ("stop", "length")
            assert metric(url, "active_batch_size") == 1
    wait_for(lambda: metric(url, 'requests_finished_total{outcome="cancelled"}') == cancelled + 1,
             "the long request to be cancelled")


def test_failing_request_does_not_stop_the_others(server, monkeypatch):
    url, app = server
    stepped = engine._Running.stepped

    def fail_seed_666(self):
        if self.request.settings.seed == 666:
            raise RuntimeError("injected fault")
        return stepped(self)

    monkeypatch.setattr(engine._Running, "stepped", fail_seed_666)
    errors_before = metric(url, 'requests_finished_total{outcome="error"}')

    async def both():
        api = client(url, cls=openai.AsyncOpenAI)
        good = api.completions.create(model=MODEL, prompt="fine", max_tokens=32, seed=1, extra_body=FAST)
        bad = api.completions.create(model=MODEL, prompt="broken", max_tokens=32, seed=666, extra_body=FAST)
        results = await asyncio.gather(good, bad, return_exceptions=True)
        await api.close()
        return results

    with server_log() as logged:
        good, bad = asyncio.run(both())
    # The client learns the request's id, and the log the engine's words.
    assert isinstance(bad, openai.InternalServerError) and "injected fault" not in bad.message
    assert bad.response.headers["x-request-id"] in bad.message
    assert good.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.APIError, match="the server failed to answer") as caught:
        list(client(url).completions.create(model=MODEL, prompt="broken", max_tokens=8, seed=666, stream=True,
                                            extra_body=FAST))
    assert "injected fault" not in caught.value.message
    assert any("injected fault" in record.getMessage() and bad.response.headers["x-request-id"] in record.getMessage()
               for record in logged)
    assert metric(url, 'requests_finished_total{outcome="error"}') == errors_before + 2
    assert httpx.get(f"{url}/health").status_code == 200
    assert app.state.scheduler.alive


def test_serve_command(checkpoint):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "diffusiongemma", "serve", checkpoint, "--port", str(port), "--api-key", "k",
               "--max-batch", "2", "--max-queue", "4", "--max-prompt-tokens", "100"]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        def healthy():
            assert process.poll() is None, process.stderr.read().decode()
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{url}/health").status_code == 200
            return False

        wait_for(healthy, "`diffusiongemma serve` to come up")
        api = client(url, key="k")
        # Served under the folder's name, not its path.
        name = os.path.basename(checkpoint)
        assert [m.id for m in api.models.list().data] == [name]
        answer = api.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=16, extra_body=FAST)
        assert answer.choices[0].finish_reason in ("stop", "length") and answer.model == name
        with pytest.raises(openai.BadRequestError):
            api.completions.create(model=name, prompt="word " * 150)
    finally:
        process.terminate()
        try:
            log = process.communicate(timeout=WAIT_SECONDS)[1].decode()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(WAIT_SECONDS)
    # uvicorn shuts down in order, then ends with the signal it got.
    assert process.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in log, log
    start = next(line for line in log.splitlines() if "serving" in line)
    for part in (f"as '{name}'", "on cpu in float32", "442,336 parameters", "at most 2 requests side by side",
                 "4 waiting", "tokens a request, 100 of them prompt", "192 denoising steps", "API key required", f"listening on {url}"):
        assert part in start, start


def test_the_served_process_flushes_subnormal_numbers(monkeypatch):
    """Set before the model loads, so that the threads the server starts inherit it (the test restores it)."""
    from diffusiongemma.hf import processing

    class Loaded(Exception):
        pass

    flushed = []

    def load(*args, **kwargs):
        flushed.append(float(torch.tensor([1e-39]) * 1.0) == 0.0)
        raise Loaded

    monkeypatch.setattr(processing.AutoProcessor, "from_pretrained", load)
    assert float(torch.tensor([1e-39]) * 1.0) != 0.0
    try:
        with pytest.raises(Loaded):
            server_module.serve("a-model")
    finally:
        torch.set_flush_denormal(False)
    assert flushed == [True]
