"""`diffusiongemma serve` throughput: the same streaming requests sent one by one, then all at once.

Starts `diffusiongemma serve` as a subprocess on the demo model that ships in the package (`--preset
demo`) or on a random-weights checkpoint (`init-random`), sends `--requests` seeded streaming chat requests
one after the other, then the same requests concurrently, and reports for both the total seconds,
requests per second, generated tokens per second, the p50 and p95 time to the first committed canvas,
and the request steps per decoder pass read from the server's /metrics. Every request's text must be the
same in both phases (a seeded request does not depend on its batch).

    .venv/bin/python benchmarks/server_throughput.py [--preset demo|tiny|small] [--requests 16] [--threads 2]
"""

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import openai
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import free_port, record  # noqa: E402

from diffusiongemma.demo import DEMO_MODEL  # noqa: E402
from diffusiongemma.hf.presets import write_random_checkpoint  # noqa: E402


def metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("diffusiongemma_"):
            name, value = line.rsplit(" ", 1)
            values[name.removeprefix("diffusiongemma_")] = float(value)
    return values


def start_server(folder: str, port: int, max_batch: int, requests: int, threads: int) -> subprocess.Popen:
    return common.start_server(folder, port, threads, ["--max-batch", str(max_batch), "--max-queue", str(requests)])


def request(i: int, args) -> dict:
    return dict(model=args.served_name, messages=[{"role": "user", "content": f"Request {i}: tell me a story."}],
                max_tokens=args.max_tokens, seed=i, stream=True, stream_options={"include_usage": True},
                extra_body={"max_denoising_steps": args.steps})


def one_by_one(url: str, args) -> list[tuple[str, int, float]]:
    """(text, tokens, seconds to the first committed text) per request."""
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
    answers = []
    for i in range(args.requests):
        text, tokens, first, start = [], 0, None, time.perf_counter()
        for chunk in api.chat.completions.create(**request(i, args)):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - start
                text.append(chunk.choices[0].delta.content)
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        answers.append(("".join(text), tokens, first or time.perf_counter() - start))
    return answers


async def all_at_once(url: str, args) -> list[tuple[str, int, float]]:
    api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)

    async def one(i):
        text, tokens, first, start = [], 0, None, time.perf_counter()
        async for chunk in await api.chat.completions.create(**request(i, args)):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - start
                text.append(chunk.choices[0].delta.content)
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return "".join(text), tokens, first or time.perf_counter() - start

    try:
        return await asyncio.gather(*(one(i) for i in range(args.requests)))
    finally:
        await api.close()


def timed(url: str, run) -> tuple[float, list[tuple[str, int, float]], float, float]:
    """(seconds, answers, request steps per decoder pass, denoising steps per canvas) of one phase."""
    before = metrics(url)
    start = time.perf_counter()
    answers = run()
    seconds = time.perf_counter() - start
    after = metrics(url)
    delta = {name: after[name] - before.get(name, 0.0) for name in after}
    per_pass = delta["decoder_forwards_total"] / max(delta["batched_steps_total"], 1)
    per_canvas = delta["denoising_steps_per_canvas_sum"] / max(delta["denoising_steps_per_canvas_count"], 1)
    return seconds, answers, per_pass, per_canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("demo", "tiny", "small"), default="demo",
                        help="the demo model that ships in the package, or a random-weights preset")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16, help="max_denoising_steps of every request")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--note", default="", help="a sentence added under the table (the machine's state)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # only for the hardware line: the server is another process

    with tempfile.TemporaryDirectory() as scratch:
        folder = str(DEMO_MODEL) if args.preset == "demo" else scratch
        if args.preset != "demo":
            write_random_checkpoint(folder, args.preset, seed=0)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(folder, port, args.max_batch, args.requests, args.threads)
        try:
            args.served_name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            print(f"one by one, then {args.requests} at once ...", file=sys.stderr)
            one_by_one(url, argparse.Namespace(**{**vars(args), "requests": 1}))  # warm-up
            phases = {"one by one": timed(url, lambda: one_by_one(url, args)),
                      f"{args.requests} at once": timed(url, lambda: asyncio.run(all_at_once(url, args)))}
        finally:
            server.terminate()
            server.wait(60)

    (_, first, _, _), (_, second, _, _) = phases.values()
    first, second = [answer[:2] for answer in first], [answer[:2] for answer in second]
    if first != second:
        differ = sum(a != b for a, b in zip(first, second))
        raise SystemExit(f"{differ} of {args.requests} answers differ between the two phases")
    rows = ["| requests sent | seconds | requests/s | generated tokens/s | first canvas p50 / p95 (s) "
            "| request steps per decoder pass | steps per canvas |", "|---|---|---|---|---|---|---|"]
    for name, (seconds, answers, per_pass, per_canvas) in phases.items():
        tokens = sum(count for _, count, _ in answers)
        firsts = sorted(first_seconds for _, _, first_seconds in answers)
        p50, p95 = firsts[len(firsts) // 2], firsts[min(len(firsts) - 1, round(0.95 * (len(firsts) - 1)))]
        rows.append(f"| {name} | {seconds:.1f} | {len(answers) / seconds:.2f} | {tokens / seconds:.1f} "
                    f"| {p50:.2f} / {p95:.2f} | {per_pass:.2f} | {per_canvas:.1f} |")
    (sequential, *_), (concurrent, *_) = phases.values()
    tokens = sum(count for _, count in first)
    weights = "the shipped demo model" if args.preset == "demo" else f"`{args.preset}` preset (random weights)"
    table = "\n".join(rows) + (
        f"\n\nAt once / one by one: {sequential / concurrent:.2f}x the throughput. {weights}, {args.requests} seeded streaming chat requests, max_tokens {args.max_tokens} "
        f"({tokens} tokens kept in all), max_denoising_steps {args.steps}, server `--max-batch {args.max_batch}` "
        f"with {args.threads} torch threads; every answer identical in both phases.")
    if args.note:
        table += f" {args.note}"
    record(f"`serve` throughput, {args.preset}", table, keep=not args.no_record)


if __name__ == "__main__":
    main()
