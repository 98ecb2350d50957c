"""`diffusiongemma serve` under a mixed load for a fixed time: does it stay up, answer, and lose nothing?

Starts `diffusiongemma serve` on a random-weights checkpoint (`init-random`) with small limits, then for
`--seconds` runs `--clients` clients side by side on 127.0.0.1, each sending, at random:

- normal requests: chat and completions, whole and streamed;
- cancelled ones: a stream closed after its first event, a whole answer given up after a moment;
- malformed ones: bad JSON, a field the server refuses, an unknown model, a lone surrogate, values out of
  range, no API key;
- oversized ones: a body over the limit (announced, or sent in chunks), a prompt over the token limit;
- slow ones: half a request head and then nothing, a body that trickles in.

Meanwhile a prober times GET /health every 0.1 s, and the server's resident memory is sampled. Each request
ends served (a whole answer), refused (the error the server owes it, or a stalled connection closed by
the server), cancelled (by its client), failed (a 5xx, or anything else it was not owed), or lost (no
answer within its deadline, or a connection dropped without one). At the end the script checks that the
server's /metrics counts add up and that it shuts down cleanly, prints the figures and appends them to
RESULTS.md. It exits non-zero if a request failed or was lost.

    .venv/bin/python benchmarks/server_soak.py [--seconds 60] [--clients 8] [--threads 1] [--no-record]
"""

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import free_port, record  # noqa: E402

from diffusiongemma.hf.presets import write_random_checkpoint  # noqa: E402

MODEL = "soak"
KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 64 * 1024
MAX_PROMPT_TOKENS = 256
READ_TIMEOUT = 2.0
# The most one request may take before it counts as lost: far more than any answer here needs.
ATTEMPT_SECONDS = 60.0
SMALL = {"max_tokens": 32, "max_denoising_steps": 8}
# Requests the server must refuse, each with the status it owes them.
MALFORMED = [
    (b"{not json", 400, AUTH),
    (json.dumps({"model": MODEL, "prompt": "hi", "logit_bias": {"5": 10}}).encode(), 400, AUTH),
    (b'{"model": "soak", "prompt": "a\\ud800"}', 400, AUTH),
    (json.dumps({"model": MODEL, "prompt": "hi", "t_max": 1e300}).encode(), 400, AUTH),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_denoising_steps": 10 ** 9}).encode(), 400, AUTH),
    (json.dumps({"model": "nope", "prompt": "hi"}).encode(), 404, AUTH),
    (json.dumps({"model": MODEL, "prompt": "hi"}).encode(), 401, {}),
    (json.dumps({"model": MODEL, "prompt": "word " * 2000}).encode(), 400, AUTH),
]


def start_server(folder: str, port: int, threads: int) -> subprocess.Popen:
    return common.start_server(folder, port, threads, [
        "--served-model-name", MODEL, "--api-key", KEY, "--max-batch", "4", "--max-queue", "8", "--max-body-bytes",
        str(MAX_BODY), "--max-prompt-tokens", str(MAX_PROMPT_TOKENS), "--read-timeout", str(READ_TIMEOUT),
        "--max-connections", "64", "--shutdown-timeout", "5", "--log-level", "warning"])


def refusal(response: httpx.Response, status: int) -> str:
    """"refused" for the error a request is owed, else "failed"."""
    try:
        owed = response.status_code == status and "error" in response.json()
    except ValueError:
        owed = False
    return "refused" if owed else "failed"


async def raw(port: int, head: bytes):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    return reader, writer


def raw_head(length: str) -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: soak\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n{length}\r\n").encode()


async def normal(http: httpx.AsyncClient, rng: random.Random, port: int) -> str:
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": MODEL, **SMALL, "seed": rng.randrange(1000),
            **({"messages": [{"role": "user", "content": "tell me a story"}]} if chat else {"prompt": "Once"})}
    # A full queue is owed a 429: a refusal, not a failure.
    if rng.random() < 0.5:
        response = await http.post(path, json=body, headers=AUTH)
        return "served" if response.status_code == 200 else refusal(response, 429)
    async with http.stream("POST", path, json={**body, "stream": True}, headers=AUTH) as response:
        if response.status_code != 200:
            await response.aread()
            return refusal(response, 429)
        lines = [line async for line in response.aiter_lines() if line]
    ended = lines[-1:] == ["data: [DONE]"] and '"finish_reason": "' in lines[-2]
    return "served" if ended else "failed"


async def cancelled(http: httpx.AsyncClient, rng: random.Random, port: int) -> str:
    body = {"model": MODEL, "prompt": "a long one", "max_tokens": 256, "max_denoising_steps": 32}
    if rng.random() < 0.5:
        async with http.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=AUTH) as response:
            if response.status_code != 200:
                await response.aread()
                return refusal(response, 429)
            async for _ in response.aiter_lines():
                return "cancelled"
        return "failed"
    try:
        response = await http.post("/v1/completions", json=body, headers=AUTH, timeout=0.3)
    except httpx.TimeoutException:
        return "cancelled"
    return "served" if response.status_code == 200 else refusal(response, 429)


async def malformed(http: httpx.AsyncClient, rng: random.Random, port: int) -> str:
    content, status, headers = rng.choice(MALFORMED)
    response = await http.post("/v1/completions", content=content,
                               headers={**headers, "Content-Type": "application/json"})
    return refusal(response, status)


async def oversized(http: httpx.AsyncClient, rng: random.Random, port: int) -> str:
    if rng.random() < 0.5:
        reader, writer = await raw(port, raw_head("Content-Length: 50000000\r\n"))
    else:
        reader, writer = await raw(port, raw_head("Transfer-Encoding: chunked\r\n"))
        # Just over the limit and no further, so that the server reads all of it before it closes.
        piece = b"x" * (MAX_BODY // 2 + 1)
        for _ in range(2):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await writer.drain()
    try:
        answer = await reader.read(256)
    finally:
        writer.close()
    return "refused" if answer.startswith(b"HTTP/1.1 413") else "failed"


async def slow(http: httpx.AsyncClient, rng: random.Random, port: int) -> str:
    if rng.random() < 0.5:
        reader, writer = await raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: so")
        try:
            closed = await reader.read(256) == b""  # the server gives up on the head
        finally:
            writer.close()
        return "refused" if closed else "failed"
    reader, writer = await raw(port, raw_head("Content-Length: 200\r\n"))
    try:
        for _ in range(20):
            writer.write(b" ")
            await writer.drain()
            try:
                answer = await asyncio.wait_for(reader.read(256), 0.5)
            except TimeoutError:
                continue
            return "refused" if answer.startswith(b"HTTP/1.1 408") else "failed"
        return "failed"
    finally:
        writer.close()


KINDS = {normal: 5, cancelled: 2, malformed: 2, oversized: 1, slow: 1}


async def client(url: str, port: int, seed: int, deadline: float, outcomes: collections.Counter) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=ATTEMPT_SECONDS) as http:
        while time.monotonic() < deadline:
            kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
            try:
                outcome = await asyncio.wait_for(kind(http, rng, port), ATTEMPT_SECONDS)
            except (TimeoutError, httpx.TransportError, ConnectionError):
                outcome = "lost"
            outcomes[outcome] += 1
            outcomes[f"{kind.__name__} {outcome}"] += 1


async def prober(url: str, deadline: float, latencies: list[float], outcomes: collections.Counter) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                ok = (await http.get("/health")).status_code == 200
            except httpx.TransportError:
                ok = False
            latencies.append(time.perf_counter() - start)
            if not ok:
                outcomes["health lost"] += 1
            await asyncio.sleep(0.1)


async def sampler(process: psutil.Process, deadline: float, peak: list[int]) -> None:
    while time.monotonic() < deadline:
        peak[0] = max(peak[0], process.memory_info().rss)
        await asyncio.sleep(0.25)


async def soak(url: str, port: int, pid: int, args) -> tuple[collections.Counter, list[float], int]:
    outcomes, latencies, peak = collections.Counter(), [], [0]
    deadline = time.monotonic() + args.seconds
    await asyncio.gather(*(client(url, port, seed, deadline, outcomes) for seed in range(args.clients)),
                         prober(url, deadline, latencies, outcomes), sampler(psutil.Process(pid), deadline, peak))
    return outcomes, latencies, peak[0]


def counts_add_up(url: str) -> bool:
    """Waits for the server to go idle, then checks received = rejected + finished + running + queued."""
    for _ in range(100):
        values = collections.defaultdict(float)
        for line in httpx.get(f"{url}/metrics").text.splitlines():
            if line.startswith("diffusiongemma_"):
                name, value = line.removeprefix("diffusiongemma_").rsplit(" ", 1)
                values[name.split("{")[0]] += float(value)
        balance = values["requests_received_total"] - values["requests_rejected_total"] - \
            values["requests_finished_total"] - values["active_batch_size"] - values["queue_depth"]
        if balance == 0 and values["active_batch_size"] + values["queue_depth"] == 0:
            return True
        time.sleep(0.1)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the load runs (default: 60)")
    parser.add_argument("--clients", type=int, default=8, help="clients side by side (default: 8)")
    parser.add_argument("--preset", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (default: 1)")
    parser.add_argument("--note", default="", help="a sentence added under the table (the machine, say)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # only for the hardware line: the server is another process

    with tempfile.TemporaryDirectory() as folder:
        write_random_checkpoint(folder, args.preset, seed=0)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(folder, port, args.threads)
        try:
            outcomes, latencies, peak = asyncio.run(soak(url, port, server.pid, args))
            balanced = counts_add_up(url)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        clean = server.returncode in (0, -signal.SIGTERM)

    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    ends = ("served", "refused", "cancelled", "failed", "lost")

    def by_kind(name: str) -> str:
        return ", ".join(f"{outcomes[f'{name} {end}']} {end}" for end in ends if outcomes[f"{name} {end}"])

    kinds = "; ".join(f"{kind.__name__}: {by_kind(kind.__name__)}" for kind in KINDS)
    total = sum(outcomes[end] for end in ends)
    table = "\n".join([
        "| requests | served | refused | cancelled by the client | failed | lost | server peak RSS | /health p99 "
        "| /health max |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {total} | {outcomes['served']} | {outcomes['refused']} | {outcomes['cancelled']} | {outcomes['failed']} "
        f"| {outcomes['lost']} | {peak / 2**20:.0f} MiB | {p99 * 1000:.0f} ms | {latencies[-1] * 1000:.0f} ms |",
        "",
        f"`{args.preset}` preset (random weights), {args.seconds:.0f} s, {args.clients} clients on 127.0.0.1 and a "
        f"/health probe every 0.1 s ({len(latencies)} probes, {outcomes['health lost']} unanswered); server "
        f"`--max-batch 4 --max-queue 8 --max-body-bytes {MAX_BODY} --max-prompt-tokens {MAX_PROMPT_TOKENS} "
        f"--read-timeout {READ_TIMEOUT:g}` with {args.threads} torch thread(s). By kind: {kinds}. /metrics counts "
        f"add up: {'yes' if balanced else 'NO'}; clean shutdown: {'yes' if clean else 'NO'}." +
        (f" {args.note}" if args.note else "")])
    record(f"`serve` soak, {args.preset} preset", table, keep=not args.no_record)
    if outcomes["failed"] or outcomes["lost"] or outcomes["health lost"] or not balanced or not clean:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
