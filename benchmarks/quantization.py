"""Quantized weights (#20) on the CPU: what each scheme costs and what it changes, against bfloat16.

For the `small` preset (random weights, written in bfloat16 as the release is) and the shipped demo model,
for bf16 and each scheme: weight bytes (all, and the text weights outside the embedding table, scales
included), the peak RSS above the process's baseline while loading (a fresh process per load), milliseconds
per denoising step of `generate` (fixed steps, batch 1), and, against bf16, the decoder's logits over a fixed
set of canvases (mean KL divergence, top-1 agreement). On the demo, `generate` over its held-out prompts with
its own settings: tokens per forward, steps per canvas, and how often the answer equals bf16's for the same
seed. Then torch's CPU operators for the products, timed alone, which decide what `QuantizedLinear` calls.
fp8 needs a GPU of compute capability 8.9+ and is not measured here.

`--gpu`: instead, on a CUDA GPU, the released architecture with random weights made on the GPU in each
scheme's own storage (no bf16 copy is ever made): peak GPU memory and milliseconds per denoising step at batch
1 (16 fixed steps, 256-token canvases, CUDA graphs) for bf16, int8, int4 and fp8 (where the GPU has it).
`--gpu --check` runs that on the `small` preset's shapes on any device, to check the script.

    .venv/bin/python benchmarks/quantization.py [--quick] [--threads 2] [--no-record]
    .venv/bin/python benchmarks/quantization.py --gpu [--check] [--no-record]
"""

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import progress, record  # noqa: E402

from diffusiongemma import (  # noqa: E402
    AutoProcessor,
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    DiffusionGemmaTextConfig,
)
from diffusiongemma.demo import DEMO_HELDOUT, DEMO_MODEL  # noqa: E402
from diffusiongemma.hf.presets import PRESETS, write_random_checkpoint  # noqa: E402
from diffusiongemma.hf.streamers import StepCounter  # noqa: E402
from diffusiongemma.model.quantization import (  # noqa: E402
    FP8,
    QuantizedWeight,
    dequantize,
    parse_scheme,
    quantizable,
    quantize,
    replace,
    weight_scheme,
)

# (row, quantization, dtype); the last row is the floor of the comparison: the same bf16 weights, computed in float32.
ROWS = [("bf16", None, "bfloat16"), ("int8", "int8", "bfloat16"), ("int4", "int4", "bfloat16"),
        ("int4-g64", "int4-g64", "bfloat16"), ("int4-g128", "int4-g128", "bfloat16"),
        ("bf16 weights, f32 compute", None, "float32")]


def weight_bytes(model) -> tuple[int, int]:
    """(all weight bytes, those of the text model outside the embedding table), each tensor once."""
    seen, total, text = set(), 0, 0
    embedding = model.model.backbone.embed_tokens.weight
    for name, tensor in list(model.named_parameters()) + [
            (f"{n}.{b}", getattr(m, b)) for n, m in model.named_modules() if isinstance(m, QuantizedWeight)
            for b in ("weight", "weight_scale")]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.nbytes
        if tensor is not embedding and "vision" not in name:
            text += tensor.nbytes
    return total, text


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measure_load(folder: str, scheme: str | None, dtype: str) -> None:
    """In a fresh process: prints {"baseline": KiB, "peak": KiB} around one load. The baseline is a process
    ready to load: the modules that building a model imports are imported, and the threads that a quantization
    runs on are started (a model built on the meta device, a quantization of a small tensor)."""
    with torch.device("meta"):
        DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig.from_json_file(os.path.join(folder, "config.json")))
    for name in ("int8", "int4"):
        quantize(torch.randn(512, 1024, dtype=torch.bfloat16), parse_scheme(name))
    # What the warm-up freed goes back to the system, so that the load cannot reuse it unseen.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    baseline = _rss_kib("VmRSS")
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=dtype, quantization=scheme)
    print(json.dumps({"baseline": baseline, "peak": _rss_kib("VmHWM"), "bytes": weight_bytes(model)[0]}))


def load_peak(folder: str, scheme: str | None, dtype: str, threads: int) -> int:
    command = [sys.executable, os.path.abspath(__file__), "--measure-load", folder, scheme or "none", dtype]
    done = subprocess.run(command, capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    figures = json.loads(done.stdout.splitlines()[-1])
    return (figures["peak"] - figures["baseline"]) * 1024


def canvases(model, prompts: list[list[int]], answers: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prompt, canvas) pairs: each answer cut or padded to a canvas, with 100%, 50% and 25% of its tokens
    replaced by random ones (the inputs of a first, middle and late denoising step)."""
    length, vocab = model.config.canvas_length, model.config.text_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    pairs = []
    for prompt, answer in zip(prompts, answers):
        clean = torch.tensor((answer + [0] * length)[:length])
        for noise in (1.0, 0.5, 0.25):
            noisy = torch.rand(length, generator=generator) < noise
            canvas = torch.where(noisy, torch.randint(0, vocab, (length,), generator=generator), clean)
            pairs.append((torch.tensor([prompt]), canvas[None]))
    return pairs


@torch.no_grad()
def logits_of(model, pairs) -> list[torch.Tensor]:
    return [model(input_ids=prompt, decoder_input_ids=canvas).logits.float()[0] for prompt, canvas in pairs]


def agreement(reference: list[torch.Tensor], other: list[torch.Tensor]) -> tuple[float, float]:
    """(mean KL(reference || other) per position, top-1 agreement)."""
    kl, same, positions = 0.0, 0, 0
    for p, q in zip(reference, other):
        log_p, log_q = p.log_softmax(-1), q.log_softmax(-1)
        kl += (log_p.exp() * (log_p - log_q)).sum().item()
        same += (p.argmax(-1) == q.argmax(-1)).sum().item()
        positions += p.shape[0]
    return kl / positions, same / positions


def step_ms(models: list, prompt: list[int], runs: int) -> list[float]:
    """Median milliseconds per denoising step of each model's `generate` with 2 canvases of 8 fixed steps,
    the models' runs alternating, so that a busy moment of the machine falls on all of them alike."""
    settings = dict(max_new_tokens=2 * models[0].config.canvas_length, max_denoising_steps=8,
                    confidence_threshold=None, stability_threshold=None)
    times = [[] for _ in models]
    for run in range(runs + 1):  # the first is a warm-up
        for model, kept in zip(models, times):
            torch.manual_seed(run)
            start = time.perf_counter()
            model.generate(torch.tensor([prompt]), **settings)
            kept.append(time.perf_counter() - start)
    return [1000 * statistics.median(kept[1:]) / 16 for kept in times]


def generations(model, prompts: list[list[int]]) -> tuple[list[list[int]], float, float]:
    """(answers, mean tokens per forward, mean steps per canvas) of `generate` with the model's own settings,
    prompt i seeded with i."""
    answers, per_forward, steps = [], [], []
    eos = set(model.generation_config.eos_token_id)
    for seed, prompt in enumerate(prompts):
        counter = StepCounter()
        torch.manual_seed(seed)
        out = model.generate(torch.tensor([prompt]), streamer=counter)
        generated = out.sequences[0, len(prompt):].tolist()
        end = next((i for i, token in enumerate(generated) if token in eos), len(generated))
        answers.append(generated[:end + 1])
        per_forward.append(out.tokens_per_forward[0].item())
        steps += counter.steps
    return answers, statistics.mean(per_forward), statistics.mean(steps)


def evaluate(name: str, folder: str, prompts, answers, args, generate_prompts) -> list[str]:
    loaded = {}
    for label, scheme, dtype in ROWS:
        try:
            loaded[label] = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=dtype, quantization=scheme)
        except ValueError as error:
            progress(f"{name} {label}: {error}")
    progress(f"{name}: timing {len(loaded)} models, alternating")
    milliseconds = dict(zip(loaded, step_ms(list(loaded.values()), prompts[0], args.runs)))
    rows, reference, reference_answers = [], None, None
    bf16_text = weight_bytes(loaded["bf16"])[1]
    for label, scheme, dtype in ROWS:
        if label not in loaded:
            rows.append(f"| {name} | {label} | groups do not divide the model's sizes |" + " |" * 8)
            continue
        model = loaded.pop(label)
        total, text = weight_bytes(model)
        peak = load_peak(folder, scheme, dtype, args.threads)
        logits = logits_of(model, canvases(model, prompts, answers))
        reference = reference or logits
        kl, top1 = agreement(reference, logits)
        generated = "| | |"
        if generate_prompts:
            outputs, per_forward, steps = generations(model, generate_prompts)
            reference_answers = reference_answers or outputs
            same = sum(a == b for a, b in zip(outputs, reference_answers)) / len(outputs)
            generated = f"{per_forward:.2f} | {steps:.2f} | {same:.0%} |"
        rows.append(f"| {name} | {label} | {total / 2**20:.2f} | {text / bf16_text:.3f} | {peak / 2**20:.1f} "
                    f"({peak / total:.2f}x) | {milliseconds[label]:.1f} | {kl:.2e} | {top1:.2%} | {generated}")
        progress(rows[-1])
        del model
    return rows


def operators(threads: int) -> str:
    """Microseconds per product, torch's CPU operators, bf16 activations: the shapes of the small preset's
    dense MLP at one canvas, and of the release's at one canvas."""
    rows = ["| product (rows x in -> out) | bf16 F.linear | int8 _weight_int8pack_mm | int8 dequantize + linear | "
            "int4 dequantize + linear | int4 _weight_int4pack_mm_for_cpu |", "|---|---|---|---|---|---|"]
    for rows_, inner, out in ((64, 256, 512), (256, 2816, 2112)):
        x = torch.randn(rows_, inner, dtype=torch.bfloat16)
        weight = torch.randn(out, inner) * 0.02
        codes8, scale8 = quantize(weight, parse_scheme("int8"))
        codes4, scale4 = quantize(weight, parse_scheme("int4"))
        unpacked = torch.stack([codes4 & 15, codes4 >> 4], -1).flatten(-2).to(torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(unpacked, 1)
        scales_and_zeros = torch.stack([scale4.t(), torch.zeros_like(scale4.t())], -1).contiguous()
        dense = weight.to(torch.bfloat16)
        calls = [lambda: F.linear(x, dense),
                 lambda: torch._weight_int8pack_mm(x, codes8, scale8.view(-1).to(x.dtype)),
                 lambda: F.linear(x, dequantize(codes8, scale8, x.dtype)),
                 lambda: F.linear(x, dequantize(codes4, scale4, x.dtype)),
                 lambda: torch._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros)]
        cells = []
        for call in calls:
            call()
            times = []
            for _ in range(7):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            cells.append(f"{1e6 * statistics.median(times):.0f}")
        rows.append(f"| {rows_} x {inner} -> {out} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + f"\n\nMedians of 7 calls, {threads} threads."


RELEASED = dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                num_global_key_value_heads=2, sliding_window=1024, num_experts=128, top_k_experts=8,
                moe_intermediate_size=704, max_position_embeddings=262144, use_bidirectional_attention="vision")


@torch.no_grad()
def random_model(text: dict, canvas_length: int, scheme: str | None, device: torch.device):
    """The architecture with random weights made on `device`, the quantized ones as random codes with scales
    that give them the spread of the unquantized ones (std 0.02)."""
    config = DiffusionGemmaConfig(text_config=DiffusionGemmaTextConfig(**text), canvas_length=canvas_length)
    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(config)
    model.to(torch.bfloat16)
    if scheme is not None:
        for owner, attr in quantizable(model):
            replace(owner, attr, weight_scheme(owner, attr, parse_scheme(scheme)))
    model.to_empty(device=device).eval()
    for name, parameter in model.named_parameters():
        if "norm" in name or name.endswith("scale"):
            parameter.fill_(1.0)
        else:
            parameter.normal_(std=0.02)
    for name, buffer in model.named_buffers():
        if name.endswith("layer_scalar"):
            buffer.fill_(1.0)
    for module in model.modules():
        if isinstance(module, QuantizedWeight):
            codes = module.weight
            if codes.dtype == torch.uint8:
                codes.random_(0, 256)
                spread = 4.6  # the standard deviation of codes uniform in [-8, 7]
            elif codes.dtype == torch.int8:
                codes.random_(-127, 128)
                spread = 73.3
            else:
                codes.copy_(torch.randn(codes.shape, device=device).mul_(64).to(FP8))
                spread = 64.0
            module.weight_scale.fill_(0.02 / spread)
    model.model.backbone.reset_computed_buffers()
    return model


def gpu(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.check and device.type != "cuda":
        raise SystemExit("--gpu needs a CUDA GPU (or --check)")
    text, canvas_length = (PRESETS["small"]["text"], 64) if args.check else (RELEASED, 256)
    schemes = [None, "int8", "int4"]
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        schemes.append("fp8")
    rows = ["| weights | weight GiB | peak GPU memory GiB | ms / step |", "|---|---|---|---|"]
    for scheme in schemes:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model = random_model(text, canvas_length, scheme, device)
        prompt = torch.randint(3, text["vocab_size"], (1, 64), device=device)
        settings = dict(max_new_tokens=canvas_length, max_denoising_steps=16, confidence_threshold=None,
                        stability_threshold=None)
        times = []
        for _ in range(args.runs + 1):  # the first captures the graphs
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model.generate(prompt, **settings)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        rows.append(f"| {scheme or 'bf16'} | {weight_bytes(model)[0] / 2**30:.2f} | {peak / 2**30:.2f} | "
                    f"{1000 * statistics.median(times[1:]) / 16:.1f} |")
        progress(rows[-1])
        del model
    table = "\n".join(rows) + (f"\n\n{'small preset shapes (a check)' if args.check else 'The released architecture'}"
                               f", random weights, batch 1, a 64-token prompt, one canvas of 16 fixed steps, "
                               f"median of {args.runs} runs after one that captures the graphs.")
    record("Quantized weights on the GPU", table, keep=not args.no_record and not args.check)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer prompts and runs (a minute or two)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--gpu", action="store_true", help="the released architecture on a CUDA GPU instead")
    parser.add_argument("--check", action="store_true", help="with --gpu: the small preset's shapes, any device")
    parser.add_argument("--measure-load", nargs=3, metavar=("FOLDER", "SCHEME", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_load:
        folder, scheme, dtype = args.measure_load
        measure_load(folder, None if scheme == "none" else scheme, dtype)
        return
    torch.set_num_threads(args.threads)
    args.runs = 1 if args.quick else 3
    if args.gpu:
        gpu(args)
        return
    canvases_per_model, generate_count = (4, 20) if args.quick else (16, 100)

    processor = AutoProcessor.from_pretrained(DEMO_MODEL)
    with open(DEMO_HELDOUT) as handle:
        chats = [json.loads(line)["messages"] for line in handle]
    prompts = [processor.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=True)
               for chat in chats]
    prompts = [p[0] if isinstance(p[0], list) else p for p in prompts]
    answers = [processor.tokenizer.encode(chat[1]["content"], add_special_tokens=False) for chat in chats]

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        random_folder, small = os.path.join(folder, "random"), os.path.join(folder, "small")
        progress("writing the small preset's random checkpoint, in bfloat16")
        write_random_checkpoint(random_folder, "small", seed=0)
        DiffusionGemmaForBlockDiffusion.from_pretrained(random_folder, dtype="bfloat16").save_pretrained(small)
        generator = torch.Generator().manual_seed(0)
        vocab = 16384
        small_prompts = [torch.randint(3, vocab, (48,), generator=generator).tolist()
                         for _ in range(canvases_per_model)]
        small_answers = [torch.randint(3, vocab, (64,), generator=generator).tolist()
                         for _ in range(canvases_per_model)]
        rows += evaluate("small", small, small_prompts, small_answers, args, None)
    rows += evaluate("demo", str(DEMO_MODEL), prompts[:canvases_per_model], answers[:canvases_per_model], args,
                     prompts[:generate_count])

    header = ("| model | weights | weight MiB | text outside embedding vs bf16 | load peak RSS MiB (x weights) | "
              "ms / step | KL vs bf16 | top-1 vs bf16 | tokens / forward | steps / canvas | answer = bf16's |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
    table = (header + "\n" + "\n".join(rows) + f"\n\n{canvases_per_model} prompts x 3 canvases (100%, 50%, 25% of "
             f"the answer's tokens random) for KL and top-1; `generate` with the demo's own settings over "
             f"{generate_count} held-out prompts (seed i for prompt i); ms per step: 2 canvases of 8 fixed steps, "
             f"batch 1, median of {args.runs} runs alternating between the rows (the VM is shared: its timings are "
             f"noisy). int4 is int4-g32 (the attention's value path in int8); "
             "int4-g64 and int4-g128 do not divide the demo's sizes 96 and 192. Activations and the unquantized "
             "weights (embedding, norms, router, vision tower) in bf16, except in the last row; "
             f"{args.threads} torch threads.\n\n" + operators(args.threads))
    record("Quantized weights on the CPU, small preset and demo", table, keep=not args.no_record)


if __name__ == "__main__":
    main()
