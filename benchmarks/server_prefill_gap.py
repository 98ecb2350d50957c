"""How long a long prompt stalls the requests already running in `serve`'s scheduler.

Starts `--running` seeded requests on a random-weights checkpoint (`small` preset by default) with drafts on,
so that every denoising step of every request is timestamped; once each has committed a canvas and taken a
few more steps, submits one prompt of `--prompt-tokens` tokens. Reports the longest gap between two steps of a running request before
and after the long prompt arrives (its chunks, then its own denoising step beside theirs), next to the time
the slowest of its chunks takes alone, for the scheduler's chunks and for one chunk as long as the whole
prompt (what encoding it in one pass would cost them).

    .venv/bin/python benchmarks/server_prefill_gap.py [--preset small] [--running 8] [--prompt-tokens 4000]
"""

import argparse
import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import progress, record  # noqa: E402

from diffusiongemma import AutoProcessor, DiffusionGemmaForBlockDiffusion  # noqa: E402
from diffusiongemma.engine.runner import RequestsRunner  # noqa: E402
from diffusiongemma.hf.presets import write_random_checkpoint  # noqa: E402
from diffusiongemma.serving import scheduler as engine  # noqa: E402


def slowest_chunk(model, tokens: int, chunk: int) -> float:
    """Seconds of the slowest chunk when a `tokens`-token prompt is encoded `chunk` tokens at a time (the
    later chunks attend to more cached tokens)."""
    runner = RequestsRunner(model, soft_capped=True)
    prompt = torch.randint(0, model.config.text_config.vocab_size, (1, tokens))
    slowest = 0.0
    with torch.inference_mode():
        cache = runner.new_cache()
        for start in range(0, tokens, chunk):
            began = time.perf_counter()
            runner.encode(cache, prompt[:, start:start + chunk])
            slowest = max(slowest, time.perf_counter() - began)
    return slowest


def longest_gaps(model, tokenizer, args, chunk: int) -> tuple[float, float]:
    """(longest gap between two steps of a running request before the long prompt arrives, and after)."""
    scheduler = engine.Scheduler(model, tokenizer, max_batch=args.running + 1, max_queue=4, prefill_chunk=chunk,
                                 prefill_budget=chunk)
    steps: dict[int, list[float]] = {i: [] for i in range(args.running)}
    done = threading.Event()
    arrived = [None]

    def listener(i):
        def emit(event):
            if isinstance(event, engine.Draft):
                steps[i].append(time.perf_counter())
        return emit

    def long_done(event):
        if isinstance(event, (engine.Finished, engine.Failed)):
            done.set()

    scheduler.start()
    try:
        for i in range(args.running):
            prompt = tokenizer.encode(f"Request {i}: tell me a long story.")
            settings = engine.resolve_settings(model, len(prompt), max_tokens=args.max_tokens, seed=i,
                                               max_denoising_steps=args.steps, confidence_threshold=None)
            scheduler.submit(engine.Request(prompt, settings, listener(i), drafts=True))
        # Past a canvas's commit, so that the gaps before include a tick that encodes the running requests'
        # committed canvases, the longest a tick gets without the long prompt.
        while min(len(s) for s in steps.values()) < args.steps + 4:
            time.sleep(0.01)
        prompt = torch.randint(0, model.config.text_config.vocab_size, (args.prompt_tokens,)).tolist()
        settings = engine.resolve_settings(model, len(prompt), max_tokens=model.config.canvas_length, seed=0,
                                           max_denoising_steps=1)
        arrived[0] = time.perf_counter()
        scheduler.submit(engine.Request(prompt, settings, long_done))
        done.wait(600)
    finally:
        scheduler.stop()
    before, after = 0.0, 0.0
    for times in steps.values():
        for first, second in zip(times, times[1:]):
            if second < arrived[0]:
                before = max(before, second - first)
            else:
                after = max(after, second - first)
    return before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("tiny", "small"), default="small")
    parser.add_argument("--running", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--max-tokens", type=int, default=512, help="max_tokens of the running requests")
    parser.add_argument("--steps", type=int, default=16, help="max_denoising_steps of the running requests")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        write_random_checkpoint(folder, args.preset, seed=0)
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder).eval()
        tokenizer = AutoProcessor.from_pretrained(folder).tokenizer
    rows = ["| prefill chunk (tokens) | slowest chunk alone (s) | longest step gap before (s) | longest step gap "
            "after the prompt arrives (s) |", "|---|---|---|---|"]
    for chunk in (engine.PREFILL_CHUNK, args.prompt_tokens):
        progress(f"chunks of {chunk} tokens: {args.running} requests running, then a {args.prompt_tokens}-token prompt")
        alone = slowest_chunk(model, args.prompt_tokens, chunk)
        before, after = longest_gaps(model, tokenizer, args, chunk)
        rows.append(f"| {chunk} | {alone:.3f} | {before:.3f} | {after:.3f} |")
    table = "\n".join(rows) + (
        f"\n\n`{args.preset}` preset (random weights), {args.running} requests running (max_tokens "
        f"{args.max_tokens}, {args.steps} steps per canvas, no adaptive stopping), then one {args.prompt_tokens}-token "
        f"prompt; scheduler in process, {args.threads} torch threads. With the prompt cut in chunks, a running "
        "request waits at most one chunk besides its own step.")
    record(f"`serve` step gaps under a {args.prompt_tokens}-token prompt, {args.preset} preset", table,
           keep=not args.no_record)


if __name__ == "__main__":
    main()
