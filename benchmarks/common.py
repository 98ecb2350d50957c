"""Shared pieces of the benchmarks: the hardware description and the results log."""

import datetime
import os
import platform
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
