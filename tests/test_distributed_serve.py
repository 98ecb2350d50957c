"""`serve --tensor-parallel 2` under torchrun (two CPU processes, gloo): rank 0 serves HTTP, rank 1 follows its
scheduler. Its answers are the one-process server's for the same seeds, whole and streamed, requests running
side by side; SIGTERM ends both ranks; a follower that fails ends the job with its error."""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import torch
from test_server import running

from diffusiongemma import AutoProcessor, DiffusionGemmaForBlockDiffusion
from diffusiongemma.serving.server import create_app

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
# Long enough for two processes to load the tiny model on shared cores; a job slower than that hangs.
WAIT_SECONDS = 60
QUESTIONS = [("What is two plus two?", 11, False), ("Name a colour.", 12, True), ("Why is the sky blue?", 13, False)]


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_job(log, *args) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    return subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=log)


def wait_healthy(url: str, job: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        assert job.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, "the sharded server did not come up\n" + log_path.read_text()
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health").status_code == 200:
                return
        time.sleep(0.2)


def end(job: subprocess.Popen) -> None:
    """Kills whatever is left of the job: torchrun and its ranks (which it starts in sessions of their own)."""
    if job.poll() is None:
        ranks = [int(pid) for task in Path(f"/proc/{job.pid}/task").iterdir()
                 for pid in (task / "children").read_text().split()]
        job.kill()
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        job.wait(WAIT_SECONDS)


def cancelled(url: str) -> float:
    line = next(line for line in httpx.get(f"{url}/metrics").text.splitlines()
                if line.startswith('diffusiongemma_requests_finished_total{outcome="cancelled"} '))
    return float(line.split()[-1])


@contextlib.contextmanager
def one_process_server(checkpoint):
    """The same checkpoint served in this process, from a thread; yields its URL."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint).eval()
    app = create_app(model, AutoProcessor.from_pretrained(checkpoint), "alone")
    try:
        with running(app) as url:
            yield url
    finally:
        torch.set_num_threads(threads)


async def ask(url: str) -> list[tuple[str, str, list[str] | None]]:
    """The QUESTIONS asked side by side: per question (text, finish reason, the answer's tokens where whole)."""
    api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=WAIT_SECONDS)
    model = (await api.models.list()).data[0].id

    async def one(question, seed, stream):
        options = dict(model=model, messages=[{"role": "user", "content": question}], max_tokens=40, seed=seed,
                       extra_body={"max_denoising_steps": 6})
        if stream:
            text, reason = "", None
            async for chunk in await api.chat.completions.create(stream=True, **options):
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    reason = choice.finish_reason or reason
            return text, reason, None
        answer = (await api.chat.completions.create(logprobs=True, **options)).choices[0]
        return answer.message.content, answer.finish_reason, [item.token for item in answer.logprobs.content]

    return await asyncio.gather(*(one(*question) for question in QUESTIONS))


def test_sharded_server_answers_as_one_process_and_ends_on_sigterm(checkpoint, tmp_path):
    port = free_port()
    log_path = tmp_path / "job.log"
    with open(log_path, "w") as log:
        job = start_job(log, "-m", "diffusiongemma", "serve", checkpoint, "--tensor-parallel", "2",
                        "--port", port, "--max-batch", "4")
    try:
        with one_process_server(checkpoint) as alone_url:
            alone = asyncio.run(ask(alone_url))
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, job, log_path)
        sharded = asyncio.run(ask(url))
        # An unseeded request runs too: rank 0 draws its seed for every rank.
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=WAIT_SECONDS)
        name = os.path.basename(checkpoint)
        unseeded = api.completions.create(model=name, prompt="Once upon", max_tokens=16)
        assert unseeded.choices[0].finish_reason in ("stop", "length")
        # A client that leaves mid-answer: its request is dropped on every rank, and the ranks stay in step.
        endless = {"model": name, "prompt": "Once upon", "max_tokens": 16, "stream": True, "max_denoising_steps": 192,
                   "confidence_threshold": 1e-12, "stream_options": {"include_drafts": True}}
        with httpx.stream("POST", f"{url}/v1/completions", json=endless, timeout=WAIT_SECONDS) as response:
            assert next(response.iter_lines()).startswith("data: ")
        deadline = time.monotonic() + WAIT_SECONDS
        while cancelled(url) < 1:
            assert time.monotonic() < deadline, "the request of the client that left was not cancelled"
            time.sleep(0.1)
        assert asyncio.run(ask(url)) == sharded
        job.send_signal(signal.SIGTERM)
        job.wait(WAIT_SECONDS)
    finally:
        end(job)
    log = log_path.read_text()
    # The same tokens, whole answers and the streamed one alike; none of them empty, so that this means something.
    assert sharded == alone and all(tokens for _, _, tokens in alone if tokens is not None), (sharded, alone)
    assert all(text for text, _, _ in alone)
    # Rank 0 alone logs the start-up line and serves; both ranks end on their own, none is killed.
    assert sum("serving " in line for line in log.splitlines()) == 1, log
    assert "Application shutdown complete" in log and "SIGKILL" not in log, log
    assert "Traceback" not in log.split("Sending process")[0], log


def test_a_failing_follower_ends_the_sharded_server_with_its_error(checkpoint, tmp_path):
    port = free_port()
    log_path = tmp_path / "job.log"
    with open(log_path, "w") as log:
        job = start_job(log, WORKER, "fail-serving", checkpoint, port)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, job, log_path)
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{url}/v1/completions", json={"model": os.path.basename(checkpoint), "prompt": "hello", "max_tokens": 16}, timeout=WAIT_SECONDS)
        job.wait(WAIT_SECONDS)
    finally:
        end(job)
    log = log_path.read_text()
    assert job.returncode != 0
    assert "RuntimeError: rank 1 failed on purpose in a serving tick" in log, log
    assert "rank      : 1" in log, log  # torchrun's summary names the failed rank first
    # Rank 0 saw its follower go, and stopped serving rather than answer without it.
    assert "the scheduler failed, and with it the ranks' lockstep; the server stops" in log, log
