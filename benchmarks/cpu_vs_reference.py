"""CPU: our generate against the reference's, on the "small" config of REFERENCE.md section 5.

Random weights made with transformers and loaded by both; prompt 200, 256 new tokens, 16 fixed denoising
steps, float32. Runs alternate between the two engines in one process; medians are reported, and the
tokens must be identical in the default mode. `--fast-sampling` also times the opt-in sampler. What runs,
and each run's times, are reported on stderr as it goes.

    .venv/bin/python benchmarks/cpu_vs_reference.py [--runs 5] [--threads 2]
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

from diffusiongemma import DiffusionGemmaForBlockDiffusion  # noqa: E402

SMALL = dict(vocab_size=16384, hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
             sliding_window=128, num_experts=16, top_k_experts=4, moe_intermediate_size=128,
             max_position_embeddings=8192)
SETTINGS = dict(max_new_tokens=256, max_denoising_steps=16, confidence_threshold=None)


def make_checkpoint(folder: str) -> None:
    from transformers import DiffusionGemmaConfig
    from transformers import DiffusionGemmaForBlockDiffusion as Reference

    torch.manual_seed(0)
    model = Reference(DiffusionGemmaConfig(text_config=SMALL, vision_config=None, canvas_length=64)).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "norm" in name or name.endswith("scale"):
                tensor.normal_(1.0, 0.1)
    model.save_pretrained(folder)


def timed_generate(model, prompt, seed, **extra):
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = model.generate(prompt, **SETTINGS, **extra)
    return time.perf_counter() - start, out.sequences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast-sampling", action="store_true", help="also time the opt-in fast sampler")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import DiffusionGemmaForBlockDiffusion as Reference

    progress(f"making the small config's random checkpoint and loading it into both engines "
             f"(threads: {args.threads})")
    with tempfile.TemporaryDirectory() as folder:
        make_checkpoint(folder)
        reference = Reference.from_pretrained(folder, dtype=torch.float32).eval()
        ours = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype="float32")
    prompt = torch.randint(3, 16000, (1, 200), generator=torch.Generator().manual_seed(0))

    times = {"reference": [], "ours": [], "ours, fast sampling": []}
    progress("warm-up: one generate of each engine")
    ours_seconds, _ = timed_generate(ours, prompt, 0)
    reference_seconds, _ = timed_generate(reference, prompt, 0)
    per_run = reference_seconds + ours_seconds * (2 if args.fast_sampling else 1)
    progress(f"warm-up took {reference_seconds + ours_seconds:.0f} s; runs to go: {args.runs}, about "
             f"{args.runs * per_run / 60:.1f} min")
    for run in range(args.runs):
        seconds, expected = timed_generate(reference, prompt, run)
        times["reference"].append(seconds)
        seconds, actual = timed_generate(ours, prompt, run)
        times["ours"].append(seconds)
        if not torch.equal(actual, expected):
            raise SystemExit(f"run {run}: tokens differ from the reference")
        if args.fast_sampling:
            seconds, _ = timed_generate(ours, prompt, run, fast_sampling=True)
            times["ours, fast sampling"].append(seconds)
        progress(f"run {run + 1}/{args.runs}: " + ", ".join(f"{name} {values[-1]:.1f} s"
                                                               for name, values in times.items() if values))

    steps = SETTINGS["max_denoising_steps"] * SETTINGS["max_new_tokens"] // 64
    base = statistics.median(times["reference"])
    rows = ["| engine | median s / generate | ms / denoising step | speed-up |", "|---|---|---|---|"]
    for name, values in times.items():
        if values:
            median = statistics.median(values)
            rows.append(f"| {name} | {median:.3f} | {1000 * median / steps:.1f} | {base / median:.2f}x |")
    table = "\n".join(rows) + (f"\n\nSmall config (REFERENCE.md section 5), prompt 200, 256 new tokens, 16 fixed "
                               f"steps, float32, {args.runs} alternating runs; tokens identical to the reference.")
    record("CPU, small config, ours vs reference", table, keep=not args.no_record)


if __name__ == "__main__":
    main()
