"""CPU: where a denoising step's time goes, on the "small" config of `cpu_vs_reference.py`.

Times our generate part by part (the decoder's layers, its self-conditioning input, the LM head, the
sampler, the encoder) by wrapping those calls, in the default and in the fast-sampling mode; medians over
alternating runs, in milliseconds per denoising step. The wrapped calls wait for their results, so the
parts add up to a little more than an unwrapped step. What runs, and each run's times, are reported on
stderr as it goes.

    .venv/bin/python benchmarks/cpu_step_parts.py [--runs 5] [--threads 2]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import progress, record  # noqa: E402
from cpu_vs_reference import SETTINGS, make_checkpoint  # noqa: E402

from diffusiongemma import DiffusionGemmaForBlockDiffusion  # noqa: E402

PARTS = {  # name: (object path from the model, method)
    "decoder layers": ("model.backbone", "decode"),
    "self-conditioning input": ("model.decoder", "soft_embeddings"),
    "LM head and soft-capping": ("", "logits"),
    "sampler": ("", "_update_canvas"),
    "encoder (prompt and commits)": ("model.backbone", "encode"),
}


def wrap(model, totals: dict) -> None:
    for name, (path, method) in PARTS.items():
        owner = model
        for attribute in filter(None, path.split(".")):
            owner = getattr(owner, attribute)
        inner = getattr(owner, method)

        def timed(*args, _inner=inner, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                totals[_name] = totals.get(_name, 0.0) + time.perf_counter() - start
        setattr(owner, method, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    progress(f"making the small config's random checkpoint and loading it (threads: {args.threads})")
    with tempfile.TemporaryDirectory() as folder:
        make_checkpoint(folder)
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype="float32")
    prompt = torch.randint(3, 16000, (1, 200), generator=torch.Generator().manual_seed(0))
    steps = SETTINGS["max_denoising_steps"] * SETTINGS["max_new_tokens"] // 64
    totals: dict = {}
    wrap(model, totals)
    modes = {"default": False, "fast sampling": True}
    samples = {mode: {} for mode in modes}
    progress("warm-up: one generate")
    start = time.perf_counter()
    model.generate(prompt, **SETTINGS)
    warm_up = time.perf_counter() - start
    progress(f"warm-up took {warm_up:.0f} s; runs to go: {args.runs} of {len(modes)} modes each, about "
             f"{args.runs * len(modes) * warm_up / 60:.1f} min")
    for run in range(args.runs):
        for mode, fast in modes.items():
            totals.clear()
            torch.manual_seed(run)
            start = time.perf_counter()
            model.generate(prompt, **SETTINGS, fast_sampling=fast)
            totals["whole step"] = time.perf_counter() - start
            for name, seconds in totals.items():
                samples[mode].setdefault(name, []).append(1000 * seconds / steps)
        progress(f"run {run + 1}/{args.runs}: " + ", ".join(
            f"{mode} {samples[mode]['whole step'][-1] * steps / 1000:.1f} s" for mode in modes))

    names = ["whole step", *PARTS]
    rows = ["| part | " + " | ".join(f"{mode} (ms / step)" for mode in modes) + " |",
            "|---|" + "---|" * len(modes)]
    for name in names:
        rows.append(f"| {name} | " + " | ".join(f"{statistics.median(samples[mode][name]):.1f}" for mode in modes)
                    + " |")
    table = "\n".join(rows) + (f"\n\nOurs only, small config, prompt 200, 256 new tokens, 16 fixed steps, float32, "
                               f"{args.runs} alternating runs; the encoder's time is spread over the steps.")
    record("CPU, small config, parts of a denoising step", table, keep=not args.no_record)


if __name__ == "__main__":
    main()
