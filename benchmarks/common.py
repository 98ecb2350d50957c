"""Shared pieces of the benchmarks: the hardware description and the results log."""

import datetime
import os
import platform
import socket
import subprocess
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def progress(message: str) -> None:
    """A timestamped line on stderr: a run takes minutes, and its tables come only at the end."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def record(title: str, table: str, keep: bool = True) -> None:
    """Prints the table and, with `keep`, appends it, dated, to benchmarks/RESULTS.md."""
    stamp = datetime.date.today().isoformat()
    entry = f"\n## {title}, {stamp}\n\nHardware: {hardware()}\n\n{table}\n"
    print(entry)
    if keep:
        with open(RESULTS, "a", encoding="utf-8") as handle:
            handle.write(entry)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(folder: str, port: int, threads: int, options: list[str], startup_seconds: float = 120):
    """`diffusiongemma serve FOLDER` on 127.0.0.1:PORT with `options`, once its /health answers."""
    import httpx

    command = [sys.executable, "-m", "diffusiongemma", "serve", folder, "--port", str(port), *options]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + startup_seconds
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read().decode()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit("the server did not come up")
        time.sleep(0.2)
