"""The README's examples run as printed: the Python example and the `generate` commands of "Try it", on the
demo model that ships in the package, each print what the README says they print."""

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    return text[start:text.index("\n## ", start + 1)]


def try_it_commands() -> list[tuple[list[str], str]]:
    """(arguments after the program, the output the README shows) for each command of "Try it"."""
    (block,) = re.findall(r"```console\n(.*?)```", section("Try it"), re.S)
    pairs = re.findall(r"^\$ \.venv/bin/diffusiongemma (.*)\n((?:[^$].*\n)*)", block, re.M)
    return [(shlex.split(command), output) for command, output in pairs]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=300)


def test_the_examples_print_what_the_readme_says():
    (example,) = re.findall(r"```python\n(.*?)```", section("Use it from Python"), re.S)
    commands = try_it_commands()
    assert len(commands) == 2 and "Which module is `os.path.join` in?" in commands[0][0]
    with ThreadPoolExecutor(max_workers=3) as pool:
        python = pool.submit(run, ["-c", example])
        shown = [pool.submit(run, ["-m", "diffusiongemma", *args]) for args, _ in commands]
        results = [python.result(), *(future.result() for future in shown)]
    for result in results:
        assert result.returncode == 0 and result.stderr == "", result.stderr
    for (_, output), result in zip(commands, results[1:]):
        assert result.stdout == output
    # Into a pipe, only the answer: no prompt, no special tokens, no drafts' escape codes.
    assert results[0].stdout == commands[0][1]
