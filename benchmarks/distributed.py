"""Tensor-parallel inference against one process: memory per rank and time per denoising step.

For a random-weights preset checkpoint (default "small", the other benchmarks' shape): the bytes of weights
each rank holds, each rank's peak resident memory grown while loading, and the time per denoising step
(one canvas, fixed steps, medians over runs), for one process with N threads and for N torchrun ranks with
one thread each (the same cores). On the CPU the ranks talk over gloo, on CUDA over NCCL, one GPU per rank.

    .venv/bin/python benchmarks/distributed.py [--preset small] [--ranks 2] [--runs 3] [--no-record]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import progress, record  # noqa: E402

from diffusiongemma import DiffusionGemmaForBlockDiffusion  # noqa: E402
from diffusiongemma.hf.presets import write_random_checkpoint  # noqa: E402

STEPS = 16
PROMPT = 64


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def held_bytes(model) -> int:
    """The weights this process holds: a sharded tensor counts its local part only."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def measure(folder: str, warm_up: str, sharded: bool, runs: int, out: str) -> None:
    """One process's (or one rank's) figures, written to `out`."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = "auto" if sharded else None
    # A first load of a tiny checkpoint imports and sets up all that loading needs besides the weights (some
    # 100 MB), so that the growth measured below is the weights' own.
    DiffusionGemmaForBlockDiffusion.from_pretrained(warm_up, device=device, tp_plan=plan)
    before = peak_rss_bytes()
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, device=device, tp_plan=plan)
    loaded = peak_rss_bytes()
    gpu_peak = None
    # Ordinary tokens from the lower half of the vocabulary: the special ones (images) lie at its top.
    prompt = 3 + (torch.arange(PROMPT, device=model.device)[None] * 7) % (model.config.text_config.vocab_size // 2)
    settings = dict(max_new_tokens=model.config.canvas_length, max_denoising_steps=STEPS, stability_threshold=None,
                    confidence_threshold=None)
    seconds, tokens = [], None
    for run in range(runs + 1):  # the first run warms up
        torch.manual_seed(0)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        sequences = model.generate(input_ids=prompt, **settings).sequences
        if device == "cuda":
            torch.cuda.synchronize()
        if run:
            seconds.append(time.perf_counter() - start)
        tokens = sequences[0].tolist()
    if device == "cuda":
        gpu_peak = torch.cuda.max_memory_allocated()
    with open(out, "w") as handle:
        json.dump({"held": held_bytes(model), "load_growth": loaded - before, "peak_rss": peak_rss_bytes(),
                   "gpu_peak": gpu_peak, "ms_per_step": 1000 * statistics.median(seconds) / STEPS,
                   "tokens": tokens}, handle)


def run_all(args) -> None:
    here = os.path.abspath(__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (os.path.dirname(os.path.dirname(here)), os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory() as work:
        folder = os.path.join(work, args.preset)
        progress(f"writing a random '{args.preset}' checkpoint")
        write_random_checkpoint(folder, args.preset)
        warm_up = os.path.join(work, "tiny")
        write_random_checkpoint(warm_up, "tiny")
        progress(f"one process, {args.ranks} threads")
        single = os.path.join(work, "single.json")
        subprocess.run([sys.executable, here, "--worker", folder, warm_up, single, "--runs", str(args.runs)], check=True,
                       env={**env, "OMP_NUM_THREADS": str(args.ranks)})
        progress(f"torchrun, {args.ranks} ranks of one thread")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(args.ranks), here, "--worker", folder, warm_up, os.path.join(work, "rank.json"),
                        "--runs", str(args.runs), "--sharded"], check=True, env={**env, "OMP_NUM_THREADS": "1"})
        alone = json.load(open(single))
        ranks = [json.load(open(os.path.join(work, f"rank.json.{r}"))) for r in range(args.ranks)]
    same = all(r["tokens"] == alone["tokens"] for r in ranks)
    mb = 2 ** 20
    rows = [("one process", alone)] + [(f"rank {r} of {args.ranks}", figures) for r, figures in enumerate(ranks)]
    table = ["| process | weights held (MB) | vs one process | peak RSS grown while loading (MB) | "
             "peak RSS (MB) | ms / denoising step |", "|---|---|---|---|---|---|"]
    for name, figures in rows:
        table.append(f"| {name} | {figures['held'] / mb:.1f} | {figures['held'] / alone['held']:.2f}x | "
                     f"{figures['load_growth'] / mb:.1f} | {figures['peak_rss'] / mb:.0f} | "
                     f"{figures['ms_per_step']:.1f} |")
    if alone["gpu_peak"] is not None:
        table.append("\nGPU peak memory (MB): " + ", ".join(f"{name} {figures['gpu_peak'] / mb:.0f}"
                                                            for name, figures in rows))
    table.append(f"\n'{args.preset}' preset, float32, prompt {PROMPT}, one canvas of {STEPS} fixed steps, median of "
                 f"{args.runs} runs after a warm-up; one process with {args.ranks} threads against {args.ranks} "
                 f"ranks of one thread; tokens {'identical' if same else 'DIFFERENT'} to one process's.")
    record(f"Tensor-parallel inference, {args.preset} preset, {args.ranks} ranks", "\n".join(table),
           keep=not args.no_record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="print the table without adding it to RESULTS.md")
    parser.add_argument("--worker", nargs=3, metavar=("CHECKPOINT", "WARM_UP", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--sharded", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is None:
        run_all(args)
        return
    folder, warm_up, out = args.worker
    if args.sharded:
        out = f"{out}.{os.environ['RANK']}"
    measure(folder, warm_up, args.sharded, args.runs, out)


if __name__ == "__main__":
    main()
