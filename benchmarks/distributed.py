"""Tensor-parallel inference against one process: memory per rank and time per denoising step.

For a random-weights preset checkpoint (default "small", the other benchmarks' shape): the bytes of weights
each rank holds, each rank's peak resident memory grown while loading, and the time per denoising step
(one canvas, fixed steps, medians over runs), for one process with N threads and for N torchrun ranks with
one thread each (the same cores). On the CPU the ranks talk over gloo, on CUDA over NCCL, one GPU per rank.

A second table weighs the two ways to share the experts, in one thread, one rank's work at a time: whole
experts (E/N per rank, what `distributed/tensor_parallel.py` does) against every expert's matrices split N
ways (each rank all experts, 1/N of their units). Both end in the same all-reduce, which is left out. The
router is random, so the experts draw about equal numbers of tokens; a trained router's skew would slow the
first layout's busiest rank.

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


def expert_layouts(ranks: int, repeats: int = 30) -> str:
    """Milliseconds of one layer's experts for the slowest rank, in each layout (module docstring)."""
    from diffusiongemma.kernels.experts import grouped_linear

    def experts(x, weights, indices, gate_up, down, first):
        count, top_k = gate_up.shape[0], indices.shape[1]
        local = indices - first
        local = local.masked_fill((local < 0) | (local >= count), count)
        sorted_experts, order = torch.sort(local.reshape(-1))
        ends = torch.searchsorted(sorted_experts, torch.arange(1, count + 1), out_int32=True)
        order = order[:int(ends[-1])]
        gate, up = grouped_linear(x.index_select(0, order // top_k), gate_up, ends).chunk(2, dim=-1)
        out = grouped_linear(torch.nn.functional.gelu(gate, approximate="tanh") * up, down, ends)
        return torch.zeros_like(x).index_add_(0, order // top_k, out * weights.reshape(-1)[order, None])

    def median_ms(call) -> float:
        for _ in range(3):
            call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    rows = ["| experts, top-k, hidden, units, tokens | one process | whole experts per rank (slowest) | "
            "split matrices per rank (slowest) |", "|---|---|---|---|"]
    # The small preset's experts over one canvas; the released model's routing (128 experts, top 8, a
    # 256-token canvas) with its matrices scaled down by 4 to fit this benchmark's time.
    for count, top_k, hidden, units, tokens in [(16, 4, 256, 128, 64), (128, 8, 704, 176, 256)]:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, hidden, generator=generator)
        gate_up = torch.randn(count, 2 * units, hidden, generator=generator) * 0.02
        down = torch.randn(count, hidden, units, generator=generator) * 0.02
        weights, indices = torch.topk(torch.randn(tokens, count, generator=generator).softmax(-1), top_k, dim=-1)
        share, part = count // ranks, units // ranks
        whole, split = [], []
        for r in range(ranks):
            rows_of = gate_up[r * share:(r + 1) * share].clone(), down[r * share:(r + 1) * share].clone()
            whole.append(median_ms(lambda: experts(x, weights, indices, *rows_of, r * share)))
            units_of = (torch.cat([gate_up[:, r * part:(r + 1) * part],
                                   gate_up[:, units + r * part:units + (r + 1) * part]], dim=1).contiguous(),
                        down[:, :, r * part:(r + 1) * part].contiguous())
            split.append(median_ms(lambda: experts(x, weights, indices, *units_of, 0)))
        alone = median_ms(lambda: experts(x, weights, indices, gate_up, down, 0))
        rows.append(f"| {count}, {top_k}, {hidden}, {units}, {tokens} | {alone:.2f} | {max(whole):.2f} | "
                    f"{max(split):.2f} |")
    return "\n".join(rows)


def run_all(args) -> None:
    here = os.path.abspath(__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (os.path.dirname(os.path.dirname(here)), os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory() as work:
        folder = os.path.join(work, args.preset)
        progress(f"writing a random '{args.preset}' checkpoint")
        write_random_checkpoint(folder, args.preset)
        warm_up = os.path.join(work, "warm-up")
        write_random_checkpoint(warm_up, "tiny")
        singles = {}
        # On a busy machine a process's threads spin waiting for cores: one thread is its other baseline.
        for threads in sorted({args.ranks, 1}, reverse=True):
            progress(f"one process, {threads} threads")
            singles[threads] = os.path.join(work, f"single-{threads}.json")
            subprocess.run([sys.executable, here, "--worker", folder, warm_up, singles[threads], "--runs",
                            str(args.runs)], check=True, env={**env, "OMP_NUM_THREADS": str(threads)})
        progress(f"torchrun, {args.ranks} ranks of one thread")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(args.ranks), here, "--worker", folder, warm_up, os.path.join(work, "rank.json"),
                        "--runs", str(args.runs), "--sharded"], check=True, env={**env, "OMP_NUM_THREADS": "1"})
        singles = {threads: json.load(open(path)) for threads, path in singles.items()}
        ranks = [json.load(open(os.path.join(work, f"rank.json.{r}"))) for r in range(args.ranks)]
    alone = singles[args.ranks]
    same = all(r["tokens"] == alone["tokens"] for r in ranks)
    mb = 2 ** 20
    rows = [(f"one process, {threads} thread{'s' if threads > 1 else ''}", figures)
            for threads, figures in singles.items()]
    rows += [(f"rank {r} of {args.ranks}, 1 thread", figures) for r, figures in enumerate(ranks)]
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
                 f"{args.runs} runs after a warm-up; tokens {'identical' if same else 'DIFFERENT'} to one "
                 f"process's. The load average during the run: {', '.join(f'{v:.1f}' for v in os.getloadavg())}.")
    progress("the experts' two layouts")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    table.append(f"\nOne layer's experts at {args.ranks} ranks, milliseconds (median of 30, one thread):\n\n"
                 + expert_layouts(args.ranks))
    torch.set_num_threads(threads)
    backend = "NCCL" if torch.cuda.is_available() else "gloo"
    record(f"Tensor-parallel inference, {args.preset} preset, {args.ranks} ranks over {backend}", "\n".join(table),
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
