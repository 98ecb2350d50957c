"""The first maths of a fresh process: importing the model (`diffusiongemma.model`, which every model class
imports) resolves oneMKL's vector-maths dispatch on one thread (`diffusiongemma.kernels.mkl`), so a first
call that several intra-op threads make together gives the numbers one thread gives, and a fresh process's
first forward gives the logits of its second."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffusiongemma

# The subprocesses import this copy of the package, whatever else sys.path holds.
PACKAGE_ROOT = str(Path(diffusiongemma.__file__).parents[1])
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}

# Each trial is a process forked from one that did nothing but import the model, so that the trial's call
# is its process's first after the import, as in a fresh process, for a fork's price (milliseconds). Four
# intra-op threads over 10,080 values make four chunks of 2,520, each over torch's 2,048-element grain. The
# race needs a thread to make its first call within microseconds of another thread publishing the kernel
# it resolved: without the package's warm-up, on a 2-core machine shared with other work, about one trial
# in 2,000 computed a chunk with the wrong kernel. So the trials run for a fixed time, as many as fit.
TRIALS = r"""
import json, os, sys, time
import torch
threads_before = len(os.listdir("/proc/self/task"))
import diffusiongemma.model
threads_after = len(os.listdir("/proc/self/task"))

names = ("cos", "sin", "tanh", "exp", "log", "sqrt")
routines = [(name, dtype) for dtype in ("float32", "float64") for name in names]
values = {dtype: torch.linspace(0.1, 50.0, 10080, dtype=getattr(torch, dtype)) for dtype in ("float32", "float64")}

def trial(name, dtype):
    routine, x = getattr(torch, name), values[dtype]
    torch.set_num_threads(4)
    first = routine(x)
    torch.set_num_threads(1)
    return torch.equal(first, routine(x))

wrong, trials, deadline = {}, 0, time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    # Each trial's first call is another routine's, in turn.
    name, dtype = routines[trials % len(routines)]
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if trial(name, dtype) else 1)
        finally:
            os._exit(2)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code:
        key = f"{name} {dtype}" if code == 1 else f"{name} {dtype}: exit {code}"
        wrong[key] = wrong.get(key, 0) + 1
    trials += 1
print(json.dumps(dict(trials=trials, wrong=wrong, threads_before=threads_before, threads_after=threads_after)))
"""


def run_python(code: str, *args, timeout: float = 120) -> str:
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=ENV, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(not (sys.platform == "linux" and torch.backends.mkl.is_available()),
                    reason="the race is oneMKL's; the trials fork and count threads in /proc")
def test_first_multithreaded_calls_match_one_thread():
    # Two runs side by side: about 1.6 times the trials of one, at about the same rate of wrong ones.
    runs = [subprocess.Popen([sys.executable, "-c", TRIALS, "22"], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    reports = []
    try:
        for run in runs:
            stdout, stderr = run.communicate(timeout=120)
            assert run.returncode == 0, stderr
            reports.append(json.loads(stdout))
    finally:
        for run in runs:
            run.kill()
    for report in reports:
        # A forked child lacks the threads its parent had running, and would wait for them: the import
        # must start none.
        assert report["threads_after"] == report["threads_before"], report
        assert report["trials"] >= 500, report
        assert not report["wrong"], report


def test_import_leaves_the_thread_count_alone():
    assert run_python("import torch; torch.set_num_threads(3); import diffusiongemma.model; "
                      "print(torch.get_num_threads())").split() == ["3"]


FIRST_FORWARD = r"""
import torch
torch.set_num_threads(2)
from diffusiongemma import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig

torch.manual_seed(0)
text = DiffusionGemmaTextConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=32,
                                sliding_window=16, num_experts=4, top_k_experts=2, moe_intermediate_size=32)
model = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(text_config=text, canvas_length=16)).eval()
prompt = torch.randint(0, 512, (2, 80), generator=torch.Generator().manual_seed(1))
canvas = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
with torch.no_grad():
    first, second = (model(input_ids=prompt, decoder_input_ids=canvas).logits for _ in range(2))
print(torch.equal(first, second), (first - second).abs().max().item())
"""


def test_first_forward_of_a_process_gives_the_logits_of_its_second():
    # The prompt's 80 positions x 32 rotary channels and the 2 x 16 x 512 soft-capped logits are over the
    # 2,048-element grain: the first forward's cos, sin and tanh are split across both threads.
    assert run_python(FIRST_FORWARD).split() == ["True", "0.0"]
