"""GPU: the released architecture (google/diffusiongemma-26B-A4B-it) with random bfloat16 weights.

No checkpoint is needed: the reference model is built with random weights directly on the GPU and ours
shares its tensors, so the weights are in memory once (48 GB). Reported: milliseconds per denoising step and
tokens per second at 16 fixed steps (batch 1, 4, 8), prefill time for 512- and 4096-token prompts, peak GPU
memory, the fraction of the memory-bandwidth floor a step reaches, the reference's eager step at batch 1 for
the ratio, our eager step (`cuda_graphs=False`) at batch 1 and whether it gives the captured passes' tokens,
our step with torch's sampler (`fused_sampler=False`) at batch 1 and 8, how often an eager step waits for
the device, one decoder pass eager, captured and replayed (what a step spends outside the replay is the
sampler's), a canvas's commit captured and replayed, a replayed pass with the RMS norms computed three ways
(the engine's Triton kernel, the reference's composite, torch's `F.rms_norm`) and with the experts' products
computed two ways (the engine's Triton kernel, torch's `F.grouped_mm`), the kernels a step spends its
device time in, and the server's scheduler (in this process) answering 1, 4 and 8 requests sent at once. A part that fails records its error and the others still run. `--tiny` runs the same
script on a small config (any device) to check it; without it, a machine without CUDA is refused.

    .venv/bin/python benchmarks/gpu_released_arch.py [--tiny] [--no-record] [--without-triton]
"""

import argparse
import contextlib
import os
import queue
import statistics
import sys
import time
import traceback
import warnings
from unittest import mock

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import record  # noqa: E402

from diffusiongemma import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion  # noqa: E402
from diffusiongemma.engine.graphs import GraphedPasses  # noqa: E402
from diffusiongemma.hf.loading import checkpoint_tensors  # noqa: E402
from diffusiongemma.kernels import fused  # noqa: E402
from diffusiongemma.model import layers  # noqa: E402
from diffusiongemma.model.cache import KVCache  # noqa: E402
from diffusiongemma.serving import scheduler as engine  # noqa: E402

RELEASED = dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                num_global_key_value_heads=2, sliding_window=1024, num_experts=128, top_k_experts=8,
                moe_intermediate_size=704, max_position_embeddings=262144, use_bidirectional_attention="vision")
TINY = dict(RELEASED, vocab_size=4096, hidden_size=128, intermediate_size=128, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, global_head_dim=64,
            num_global_key_value_heads=1, sliding_window=256, num_experts=16, top_k_experts=4,
            moe_intermediate_size=64)
# Bytes per second a step can read, as REFERENCE.md section 5 assumes.
BANDWIDTH = {"H200": 4.3e12, "H100": 3.0e12}
STEPS = 16


def build(text: dict, canvas_length: int, device: torch.device):
    """(reference, ours): random weights made once, by the reference, and shared."""
    from transformers import DiffusionGemmaConfig as ReferenceConfig
    from transformers import DiffusionGemmaForBlockDiffusion as Reference

    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        reference = Reference(ReferenceConfig(text_config=text, canvas_length=canvas_length)).eval()
    torch.set_default_dtype(torch.float32)
    shared = reference.state_dict()
    config = DiffusionGemmaConfig.from_dict(reference.config.to_dict())
    with torch.device("meta"):
        ours = DiffusionGemmaForBlockDiffusion(config)
    for name, _, _, module, attr in checkpoint_tensors(ours):
        tensor = shared[name]
        if attr in module._parameters:
            module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[attr] = tensor
    ours.model.backbone.reset_computed_buffers()
    return reference, ours.eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(device, function, repeats=3) -> float:
    """Median wall time of `function()`."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def step_time(model, device, batch: int, prompt_length: int, vocab: int, repeats: int, **extra) -> float:
    """Seconds per denoising step: a call of one canvas of 16 fixed steps less one of a single step, over
    15, so that what a call spends once (the prompt's prefill, setting up) cancels out."""
    prompt = torch.randint(3, vocab - 3, (batch, prompt_length), device=device)

    def call(steps: int) -> float:
        settings = dict(max_new_tokens=model.config.canvas_length, max_denoising_steps=steps,
                        confidence_threshold=None, **extra)
        return seconds(device, lambda: model.generate(prompt, **settings), repeats)

    return (call(STEPS) - call(1)) / (STEPS - 1)


class IdsTokenizer:
    """What the scheduler asks of a tokenizer, for a model that has none: its ids spelled out."""

    all_special_ids = ()

    def decode(self, ids, **kwargs) -> str:
        return " ".join(map(str, ids))

    def convert_ids_to_tokens(self, token) -> str:
        return str(token)


def served_times(model, device, prompt_length: int, vocab: int, repeats: int) -> dict[int, float]:
    """Seconds, per number of requests (1, 4, 8) sent at once to the server's scheduler, until every answer
    (one canvas of 16 steps, as no random model's confidence stops a canvas earlier) is done, prompts
    included. The first round captures each bucket's graphs and is not timed."""
    canvas = model.config.canvas_length
    scheduler = engine.Scheduler(model, IdsTokenizer(), max_batch=8, max_queue=8,
                                 max_model_len=prompt_length + canvas)
    settings = engine.resolve_settings(model, prompt_length, max_tokens=canvas, max_denoising_steps=STEPS,
                                       confidence_threshold=1e-12, ignore_eos=True, seed=0)
    prompt = torch.randint(3, vocab - 3, (prompt_length,)).tolist()

    def answer_all(count: int) -> None:
        done = queue.Queue()
        for _ in range(count):
            scheduler.submit(engine.Request(prompt, settings, done.put))
        finished = 0
        while finished < count:
            event = done.get(timeout=600)
            if isinstance(event, engine.Failed):
                raise RuntimeError(event.message)
            finished += isinstance(event, engine.Finished)

    scheduler.start()
    try:
        for count in (1, 4, 8):
            answer_all(count)
        return {count: seconds(device, lambda: answer_all(count), repeats) for count in (1, 4, 8)}
    finally:
        scheduler.stop()


@torch.no_grad()
def prefill_time(model, device, length: int, vocab: int, repeats: int) -> float:
    """Seconds to encode a batch-1 prompt, as `generate` does on CUDA (into its static cache)."""
    passes = GraphedPasses(model, 1, length, key=())
    prompt = torch.randint(3, vocab - 3, (1, length), device=device)
    mask = torch.ones(1, length, dtype=torch.bool, device=device)
    return seconds(device, lambda: passes.prefill(prompt, mask, None), repeats)


@torch.no_grad()
def syncs_per_step(model, vocab: int) -> float:
    """Host synchronisations per denoising step (CUDA only): the warnings of torch's sync debug mode over
    a canvas of 16 steps less those over 2 steps, per step. Zero is what capturing a step in a CUDA graph
    needs."""
    prompt = torch.randint(3, vocab - 3, (1, 512), device="cuda")
    counts = {}
    for steps in (2, STEPS):
        settings = dict(max_new_tokens=model.config.canvas_length, max_denoising_steps=steps,
                        confidence_threshold=None, cuda_graphs=False)
        model.generate(prompt, **settings)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model.generate(prompt, **settings)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[steps] = len(caught)
    return (counts[STEPS] - counts[2]) / (STEPS - 2)


def graphed_passes(model, vocab: int):
    """(passes, canvas tokens, self-conditioning logits): a batch-1 `GraphedPasses` over a 512-token prefix,
    with room for 28 commits, and the inputs of a decoder pass with self-conditioning (CUDA only)."""
    passes = GraphedPasses(model, 1, 8192, key=())
    passes.prefill(torch.randint(3, vocab - 3, (1, 512), device="cuda"), torch.ones(1, 512, dtype=torch.bool,
                                                                                    device="cuda"), None)
    canvas = torch.randint(3, vocab - 3, (1, model.config.canvas_length), device="cuda")
    self_conditioning = torch.randn(1, model.config.canvas_length, vocab, device="cuda", dtype=torch.bfloat16)
    return passes, canvas, self_conditioning


@torch.no_grad()
def pass_times(model, vocab: int, repeats: int) -> str:
    """Where a captured batch-1 step goes (CUDA only): one decoder pass with self-conditioning run eagerly
    (over a `KVCache`, as `cuda_graphs=False` runs it), captured (once per shape, for every later call) and
    replayed, and a canvas's commit captured and replayed; the rest of a step is the sampler's."""
    cuda = torch.device("cuda")
    passes, canvas, self_conditioning = graphed_passes(model, vocab)
    cache = KVCache(model.config.text_config, model.config.canvas_length)
    model.model.encoder(input_ids=torch.randint(3, vocab - 3, (1, 512), device="cuda"), past_key_values=cache)
    positions = torch.arange(512, 512 + model.config.canvas_length, device="cuda")[None]
    eager = seconds(cuda, lambda: model.decoder_scores(cache, None, positions, canvas, self_conditioning, None), repeats)

    def capture_and_replay():
        passes.decoders.clear()
        passes.decode(canvas, self_conditioning, soft_capped=False)

    capture = seconds(cuda, capture_and_replay, repeats)
    replay = seconds(cuda, lambda: passes.decode(canvas, self_conditioning, soft_capped=False), repeats)
    first_commit = seconds(cuda, lambda: passes.commit(canvas), 1)
    commit = seconds(cuda, lambda: passes.commit(canvas), repeats)
    return (f"One batch-1 decoder pass (LM head included): eager {1000 * eager:.1f} ms, replayed "
            f"{1000 * replay:.1f} ms; a capture with its replay (once per shape) {1000 * capture:.1f} ms. A "
            f"canvas's commit replayed: {1000 * commit:.1f} ms (its capture with its replay "
            f"{1000 * first_commit:.1f} ms).")


@torch.no_grad()
def pass_variants(model, vocab: int, repeats: int, part: str, variants: dict) -> str:
    """One replayed batch-1 pass with each way of computing `part` (CUDA only): `variants` maps a name to the
    patches (owner, attribute, value) its capture runs under, the engine's way first and the way the
    reference computes it second; and how far the engine's logits move from the second's."""
    passes, canvas, self_conditioning = graphed_passes(model, vocab)
    cuda = torch.device("cuda")
    logits, replay = {}, {}
    for name, patches in variants.items():
        passes.decoders.clear()
        with contextlib.ExitStack() as stack:
            for owner, attribute, value in patches:
                stack.enter_context(mock.patch.object(owner, attribute, value))
            passes.decode(canvas, self_conditioning, soft_capped=True)
        replay[name] = seconds(cuda, lambda: passes.decode(canvas, self_conditioning, soft_capped=True), repeats)
        logits[name] = passes.decode(canvas, self_conditioning, soft_capped=True).clone()
    ours, theirs = list(logits.values())[:2]
    moved = (ours - theirs).abs().max().item()
    same_argmax = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    times = "; ".join(f"{name}: {1000 * seconds_:.2f} ms" for name, seconds_ in replay.items())
    return (f"A replayed batch-1 pass with {part} computed as {times}. The engine's logits differ from the "
            f"second's by up to {moved:.3g} and keep their argmax at {same_argmax:.1%} of positions.")


NORMS = {
    "one Triton kernel (the engine)": (),
    "as the reference writes them (its bits)": ((fused, "usable", lambda device: False),),
    "torch's `F.rms_norm`": ((layers, "rms_norm", lambda x, weight, eps: F.rms_norm(x, (x.shape[-1],), weight,
                                                                                     eps)),),
}
EXPERTS = {
    "one Triton kernel (the engine)": (),
    "torch's `F.grouped_mm`, as the reference": ((fused, "grouped_linear", lambda x, weight, ends: F.grouped_mm(
        x, weight.transpose(-2, -1), offs=ends)),),
}


@torch.no_grad()
def kernel_times(model, device, vocab: int, shown: int = 15) -> str:
    """Where a batch-1 step's time goes on the device: the kernels of one canvas of 16 fixed steps (CPU
    operations without CUDA), largest first, per denoising step (the canvas's encoder pass included)."""
    prompt = torch.randint(3, vocab - 3, (1, 512), device=device)
    settings = dict(max_new_tokens=model.config.canvas_length, max_denoising_steps=STEPS, confidence_threshold=None)
    model.generate(prompt, **settings)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as profiled:
        model.generate(prompt, **settings)
        synchronize(device)
    if cuda:
        events = [(e, e.self_device_time_total) for e in profiled.key_averages()
                  if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        events = [(e, e.self_cpu_time_total) for e in profiled.key_averages()]
    events.sort(key=lambda pair: pair[1], reverse=True)
    total = sum(time_us for _, time_us in events)
    rows = [f"| {'kernel' if cuda else 'operation'} | calls per step | ms per step | share |", "|---|---|---|---|"]
    rows += [f"| `{event.key[:80]}` | {event.count / STEPS:.1f} | {time_us / 1000 / STEPS:.2f} | "
             f"{time_us / total:.0%} |" for event, time_us in events[:shown]]
    return "\n".join(rows) + f"\n\nIn all: {total / 1000 / STEPS:.1f} ms per step."


@torch.no_grad()
def same_tokens(model, device, vocab: int, switch: str) -> bool:
    """Whether `generate` gives the same tokens with the switch on and off (2 canvases, batch 2)."""
    prompt = torch.randint(3, vocab - 3, (2, 512), device=device)
    settings = dict(max_new_tokens=2 * model.config.canvas_length, max_denoising_steps=STEPS)
    outputs = []
    for on in (False, True):
        torch.manual_seed(0)
        outputs.append(model.generate(prompt, **{switch: on}, **settings).sequences)
    return torch.equal(*outputs)


@torch.no_grad()
def bytes_per_step(model, device, vocab: int) -> int:
    """Weights a batch-1 step must read: everything but the experts, plus the experts its canvas routes to."""
    touched = []
    hooks = [layer.router.register_forward_hook(lambda _, __, out: touched.append(out[1].unique().numel()))
             for layer in model.model.backbone.layers]
    cache = model.model.encoder(input_ids=torch.randint(3, vocab - 3, (1, 512), device=device)).past_key_values
    touched.clear()
    model(past_key_values=cache,
          decoder_input_ids=torch.randint(3, vocab - 3, (1, model.config.canvas_length), device=device))
    for hook in hooks:
        hook.remove()
    experts = model.model.backbone.layers[0].experts
    per_expert = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * 2
    expert_bytes = sum(p.numel() for layer in model.model.backbone.layers for p in layer.experts.parameters()) * 2
    dense_bytes = sum(p.numel() for p in model.model.decoder.parameters()) * 2 - expert_bytes
    # The embedding is read twice: by the LM head and by self-conditioning.
    embed_bytes = model.model.backbone.embed_tokens.weight.numel() * 2
    return dense_bytes + embed_bytes + per_expert * sum(touched)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small config, to check the script anywhere")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--without-triton", action="store_true",
                        help="torch's operations in place of the fused Triton kernels (norms, experts, sampler)")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_released_arch.py: error: no CUDA device here, and the released architecture needs "
                         "a GPU (48 GB of weights); --tiny runs the same script on a small config, on any device")
    if args.without_triton:
        fused.usable = lambda device: False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text, canvas = (TINY, 64) if args.tiny else (RELEASED, 256)
    repeats = 1 if args.tiny else 3
    reference, ours = build(text, canvas, device)
    vocab = text["vocab_size"]
    config = (f"{'Small check config' if args.tiny else 'Released architecture'}, random bf16 weights, prompt 512, "
              f"canvas {canvas}, {STEPS} fixed steps, medians of {repeats}"
              f"{', without the Triton kernels' if args.without_triton else ''}.")
    kind = "tiny check config" if args.tiny else "released architecture"
    header = ["| engine | batch | ms / denoising step | tokens / s | peak GPU memory GB |", "|---|---|---|---|---|"]

    def row(engine: str, batch: int, step: float, peak: str = "") -> str:
        return f"| {engine} | {batch} | {1000 * step:.1f} | {batch * canvas / (STEPS * step):.0f} | {peak} |"

    # Each part is recorded as soon as it is measured, and a part that fails (a new GPU, driver or torch)
    # records its error and leaves the others to run: one run has to say as much as it can.
    measured = {}

    def part(title: str, measure) -> None:
        try:
            text = measure()
        except Exception as error:
            traceback.print_exc()
            text = f"Failed: {type(error).__name__}: {error}"
        record(f"GPU, {kind}, {title}", f"{text}\n\n{config}", keep=not args.no_record)

    def eager_steps() -> str:
        # Needs no CUDA graph; comes first.
        measured["eager"] = step_time(ours, device, 1, 512, vocab, repeats, cuda_graphs=False)
        measured["reference"] = step_time(reference, device, 1, 512, vocab, 1)
        prefill = {n: prefill_time(ours, device, n, vocab, repeats) for n in (512, 4096)}
        return "\n".join(header + [row("ours, eager (`cuda_graphs=False`)", 1, measured["eager"]),
                                   row("reference (eager)", 1, measured["reference"])]) + (
            f"\n\nPrefill (ours, batch 1): 512 tokens {1000 * prefill[512]:.1f} ms, 4096 tokens "
            f"{1000 * prefill[4096]:.1f} ms.")

    def captured_steps() -> str:
        rows, step_s = list(header), {}
        for batch in (1, 4, 8):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step_s[batch] = step_time(ours, device, batch, 512, vocab, repeats)
            peak = f"{torch.cuda.max_memory_allocated() / 1e9:.1f}" if device.type == "cuda" else "not measured"
            rows.append(row("ours", batch, step_s[batch], peak))
        unfused = {batch: step_time(ours, device, batch, 512, vocab, repeats, fused_sampler=False)
                   for batch in (1, 8)}
        rows += [row("ours, torch's sampler (`fused_sampler=False`)", batch, unfused[batch]) for batch in unfused]
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        bandwidth = next((value for key, value in BANDWIDTH.items() if key in name), None)
        floor = bytes_per_step(ours, device, vocab) / bandwidth if bandwidth else float("nan")
        weights = sum(p.numel() * p.element_size() for p in ours.parameters())
        reference_step = measured.get("reference", float("nan"))
        return "\n".join(rows) + (
            f"\n\nSpeed-up over the reference's eager step at batch 1: {reference_step / step_s[1]:.2f}x (our eager "
            f"step: {reference_step / measured.get('eager', float('nan')):.2f}x). Batch 8 gives "
            f"{8 * step_s[1] / step_s[8]:.1f}x the tokens per second of batch 1. The fused sampler saves "
            f"{1000 * (unfused[1] - step_s[1]):.1f} ms per step at batch 1 and "
            f"{1000 * (unfused[8] - step_s[8]):.1f} ms at batch 8. Bandwidth floor of a batch-1 step: {1000 * floor:.1f} ms, reached to "
            f"{floor / step_s[1]:.0%}. Weights: {weights / 1e9:.1f} GB.")

    def graph_checks() -> str:
        syncs = f"{syncs_per_step(ours, vocab):.1f}" if device.type == "cuda" else "not measured (no CUDA)"
        passes = pass_times(ours, vocab, repeats) if device.type == "cuda" else "Pass times: not measured (no CUDA)."
        return (f"Host synchronisations per eager denoising step: {syncs}. Replayed and eager passes give the same "
                f"tokens (2 canvases, batch 2; the static cache's last bits may change some): "
                f"{same_tokens(ours, device, vocab, 'cuda_graphs')}. The fused and "
                f"torch's sampler give the same tokens (last-bit differences may change some): "
                f"{same_tokens(ours, device, vocab, 'fused_sampler')}. {passes}")

    part("eager steps", eager_steps)
    part("ours vs reference", captured_steps)
    part("CUDA graphs", graph_checks)
    if device.type == "cuda" and not args.without_triton:
        part("RMS norms", lambda: pass_variants(ours, vocab, repeats, "the RMS norms", NORMS))
        part("experts' products", lambda: pass_variants(ours, vocab, repeats, "the experts' products", EXPERTS))
    part("where a batch-1 step's time goes",
         lambda: f"{kernel_times(ours, device, vocab)}\n\nTorch profiler over one canvas.")

    def served() -> str:
        times = served_times(ours, device, 512, vocab, repeats)
        rates = {count: count * canvas / value for count, value in times.items()}
        rows = ["| requests at once | seconds | tokens / s |", "|---|---|---|"] + [
            f"| {count} | {times[count]:.3f} | {rates[count]:.0f} |" for count in times]
        return "\n".join(rows) + (f"\n\n8 requests at once give {rates[8] / rates[1]:.1f}x the tokens per second of "
                                  "one; each request: a 512-token prompt and one canvas of 16 steps, end to end.")

    part("served batches", served)

if __name__ == "__main__":
    main()
