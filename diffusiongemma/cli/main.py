"""The `diffusiongemma` command: generate, chat, info, init-random, train and serve.

A user's mistake ends in one line on stderr and a non-zero exit status; a traceback means a bug. torch and
the engine are imported only once a command runs, so that `--help`, `--version` and a mistyped argument
answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

from ..demo import DEMO_MODEL
from ..engine.text import cut_at_end, eos_ids

if TYPE_CHECKING:
    import torch

    from ..hf.modeling import DiffusionGemmaForBlockDiffusion
    from ..hf.processing import DiffusionGemmaProcessor
    from ..model.cache import KVCache
    from ..model.config import DiffusionGemmaConfig
    from ..model.vision import VisionConfig

PROG = "diffusiongemma"
GENERATION_FLAGS = ("max_new_tokens", "max_denoising_steps", "t_min", "t_max", "stability_threshold",
                    "confidence_threshold")
# The names of `hf.presets.PRESETS`, which cannot be imported without torch; a test keeps the two equal.
PRESET_NAMES = ("tiny", "small")
CHAT_COMMANDS = "/reset starts a new conversation, /help lists these commands, /exit quits"
# Stands in for an earlier answer when rendering what the chat template writes after one.
ANSWER_MARKER = "ANSWER-MARKER-4d9c"


def _user_errors() -> tuple[type[BaseException], ...]:
    import jinja2
    import torch

    return ValueError, OSError, NotImplementedError, jinja2.TemplateError, torch.OutOfMemoryError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def _version() -> str:
    try:
        return metadata.version(PROG)
    except metadata.PackageNotFoundError:
        return "(not installed; run from a source tree)"


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0: generate and chat sample every token and have no greedy "
                                         "mode (only `serve` takes a temperature of 0)")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _resolve(model: str, patterns: list[str] | None = None) -> str:
    """The local folder of MODEL: a folder as it is, a Hub id fetched or found in the cache (only the files
    matching `patterns`, by default a checkpoint's)."""
    from huggingface_hub.utils import logging as hub_logging

    from ..hf.loading import HUB_PATTERNS, resolve_folder

    # Without a network the Hub client would log every retry before the one error that says it all.
    hub_logging.set_verbosity_error()
    return resolve_folder(model, patterns or HUB_PATTERNS)


def _device(name: str) -> str:
    """--device checked before anything loads: a device string torch reads, naming a device this machine has."""
    import torch

    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device torch knows (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA was asked for, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "meta":
        raise ValueError("--device meta holds shapes but no values: name a device that computes")
    try:
        torch.empty(0, device=device)
    # Each backend that is missing fails in its own way (an assertion, a missing module, a missing kernel).
    except Exception as error:
        raise ValueError(f"--device {name} is not available here: {str(error).splitlines()[0]}") from None
    return name


def _checkpoint_folder(model: str) -> str:
    """The local folder of a checkpoint (fetched first for a Hub id), refused unless it is complete."""
    from ..hf.loading import INDEX_NAME, WEIGHTS_NAME

    folder = _resolve(model)
    present = set(os.listdir(folder))
    missing = [name for name in ("config.json", "tokenizer.json") if name not in present]
    if not present & {WEIGHTS_NAME, INDEX_NAME}:
        missing.append(WEIGHTS_NAME)
    if missing:
        raise FileNotFoundError(f"{folder} is not a complete checkpoint: it has no {', '.join(missing)}")
    return folder


def _config_file(model: str) -> str:
    """config.json alone: `info` must not download the weights of a Hub checkpoint."""
    folder = _resolve(model, ["config.json"])
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {folder}")
    return path


def _generation_overrides(args, folder: str) -> dict:
    """The generation parameters the user set, checked against the checkpoint's own before the weights load.
    --temperature scales both ends of the schedule that results, as the server's `temperature` does."""
    from ..engine.generate import DiffusionGemmaGenerationConfig
    from ..engine.sampler import EntropyBoundSamplerConfig

    if args.no_adaptive_stopping and (args.stability_threshold is not None or args.confidence_threshold is not None):
        raise ValueError("--no-adaptive-stopping cannot be combined with --stability-threshold or "
                         "--confidence-threshold")
    overrides = {name: getattr(args, name) for name in GENERATION_FLAGS if getattr(args, name) is not None}
    if args.entropy_bound is not None:
        overrides["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=args.entropy_bound)
    if args.no_adaptive_stopping:
        overrides.update(stability_threshold=None, confidence_threshold=None)
    path = os.path.join(folder, "generation_config.json")
    checkpoint = (DiffusionGemmaGenerationConfig.from_pretrained(path) if os.path.isfile(path)
                  else DiffusionGemmaGenerationConfig())
    checkpoint.update(**overrides)
    if args.temperature is not None:
        # What `generate` falls back to for what neither the user nor the checkpoint set.
        checkpoint.update(defaults_only=True, **checkpoint.defaults())
        overrides.update(t_min=checkpoint.t_min * args.temperature, t_max=checkpoint.t_max * args.temperature)
    return overrides


def _load(args) -> tuple[str, DiffusionGemmaProcessor, dict]:
    from ..hf.processing import AutoProcessor

    _device(args.device)
    folder = _checkpoint_folder(args.model)
    return folder, AutoProcessor.from_pretrained(folder), _generation_overrides(args, folder)


def _images(args, folder: str) -> list:
    """The --image files, read before the weights load so that a bad one fails fast, and once for a chat
    that attaches them to the first message of every conversation."""
    from ..hf.image_processing import load_image
    from ..model.config import DiffusionGemmaConfig

    if not args.image:
        return []
    if DiffusionGemmaConfig.from_json_file(os.path.join(folder, "config.json")).vision_config is None:
        raise ValueError(f"--image needs a checkpoint with a vision tower, and {folder} has none "
                         "(its config.json has no vision_config)")
    return [load_image(source) for source in args.image]


@contextlib.contextmanager
def _loading_bar():
    """A `progress` callback for loading the weights that draws a bar on stderr, where stderr is a terminal
    (elsewhere None: a log file gets no bar)."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(desc="loading weights", unit="B", unit_scale=True, unit_divisor=1024, leave=False,
              file=sys.stderr) as bar:
        def progress(loaded: int, total: int) -> None:
            bar.total = total
            bar.update(loaded - bar.n)

        yield progress


def _load_model(folder: str, args) -> DiffusionGemmaForBlockDiffusion:
    import torch

    from ..hf.modeling import DiffusionGemmaForBlockDiffusion

    device = None if args.device == "auto" else torch.device(args.device)
    if device is not None and device.type == "cuda" and device.index is not None:
        # Code that asks torch for "the" CUDA device or stream must find the one the weights are on.
        torch.cuda.set_device(device)
    with _loading_bar() as progress:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=args.dtype, device=args.device,
                                                                quantization=args.quantization, progress=progress,
                                                                tp_plan="auto" if args.tensor_parallel else None)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    return model


@dataclass
class Turn:
    """One `generate` call. `answer` is every generated token up to and including the end-of-sequence
    token (the padding after it is dropped); `uncached` is the part of it the cache does not hold."""

    encoded: int
    cached: int
    answer: list[int]
    uncached: list[int]
    steps: list[int]
    tokens_per_forward: float
    seconds: float
    cache: KVCache

    @property
    def tokens_per_second(self) -> float:
        return len(self.answer) / self.seconds

    def summary(self) -> str:
        return (f"encoded {self.encoded} new tokens after {self.cached} cached; generated {len(self.answer)} tokens "
                f"in {len(self.steps)} canvases (steps {', '.join(map(str, self.steps))}), "
                f"{self.tokens_per_forward:.2f} tokens per forward, {self.seconds:.2f} s, "
                f"{self.tokens_per_second:.1f} tokens/s")


def _run_turn(model, inputs: dict[str, torch.Tensor], cache: KVCache | None, display, overrides: dict) -> Turn:
    """`inputs`: what `generate` takes besides the settings, `input_ids` [1, tokens] first among them."""
    from ..hf.streamers import StepCounter

    counter = StepCounter(display)
    cached = 0
    if cache is not None:
        cached = cache.get_seq_length()
        # `generate` refuses a cache next to a cache layout; every layout gives the same tokens here.
        overrides = {**overrides, "cache_implementation": None}
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
    prompt_length = inputs["input_ids"].shape[1]
    start = time.perf_counter()
    out = model.generate(**inputs, past_key_values=cache, streamer=counter, **overrides)
    seconds = time.perf_counter() - start
    eos = eos_ids(model.generation_config.eos_token_id)
    generated = out.sequences[0, prompt_length:].tolist()
    # The last canvas is never encoded (no later canvas needed it); a follow-up turn encodes it.
    last_canvas = generated[-model.config.canvas_length:]
    return Turn(encoded=prompt_length, cached=cached, answer=cut_at_end(generated, eos),
                uncached=cut_at_end(last_canvas, eos), steps=counter.steps,
                tokens_per_forward=out.tokens_per_forward[0].item(), seconds=seconds, cache=out.past_key_values)


def _display(tokenizer, drafts: bool):
    from ..hf.streamers import TextDiffusionStreamer, TextStreamer

    kind = TextDiffusionStreamer if drafts else TextStreamer
    return kind(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _ids(ids: list[int]) -> dict[str, torch.Tensor]:
    import torch

    return {"input_ids": torch.tensor([ids])}


def _first_turn(processor: DiffusionGemmaProcessor, message: str, images: list,
                system: str | None) -> dict[str, torch.Tensor]:
    """The processor's whole output: with images, their pixels and where their soft tokens go too."""
    content = [*({"type": "image", "image": image} for image in images), {"type": "text", "text": message}]
    conversation = [] if system is None else [{"role": "system", "content": system}]
    conversation.append({"role": "user", "content": content})
    return processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt",
                                         add_generation_prompt=True)


def _next_turn(processor: DiffusionGemmaProcessor, answer: list[int], message: str) -> list[int]:
    """The tokens that follow an answer the cache mostly holds: its uncached end, the template's closing of
    the model's turn, the new message and the generation prompt. The answer itself is never re-tokenized."""
    conversation = [{"role": "user", "content": "-"}, {"role": "assistant", "content": ANSWER_MARKER},
                    {"role": "user", "content": message}]
    rendered = processor.apply_chat_template(conversation, add_generation_prompt=True)
    if ANSWER_MARKER not in rendered:
        raise ValueError("this chat template does not write earlier answers back, so a conversation cannot "
                         "continue from the cache")
    after = processor.tokenizer.encode(rendered[rendered.index(ANSWER_MARKER) + len(ANSWER_MARKER):],
                                       add_special_tokens=False)
    # An answer that stopped on the template's end-of-turn token already wrote the start of the closing.
    if answer and after and answer[-1] == after[0]:
        after = after[1:]
    return answer + after


def _check_fits(length: int, folder: str) -> None:
    from ..model.config import DiffusionGemmaConfig

    config = DiffusionGemmaConfig.from_json_file(os.path.join(folder, "config.json"))
    limit = config.text_config.max_position_embeddings
    if length >= limit:
        raise ValueError(f"the prompt is {length} tokens long, but the model has only {limit} positions")


def _join_tensor_parallel(args):
    """With --tensor-parallel N: joins the torchrun job (N ranks) and returns `distributed.runtime`, else None.
    Every rank runs the same generation on its shards; rank 0 alone reads stdin, prints, streams and serves
    HTTP, the others' output is dropped (their errors still show)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.tensor_parallel is None:
        if world > 1:
            raise ValueError(f"torchrun started {world} processes, but without --tensor-parallel each would run the "
                             f"whole model alone: add --tensor-parallel {world}")
        return None
    import torch

    from ..distributed import runtime

    device_type = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    runtime.start(device_type, size=args.tensor_parallel)
    if not runtime.is_leader():
        sys.stdout = open(os.devnull, "w")
        args.verbose = False
    return runtime


def cmd_generate(args) -> None:
    if len(args.model_and_prompt) > 2:
        raise ValueError(f"generate takes [MODEL] PROMPT, got {len(args.model_and_prompt)} arguments; "
                         "quote a prompt that has spaces")
    args.model, args.prompt = ([str(DEMO_MODEL)] + args.model_and_prompt)[-2:]
    if args.raw and args.image:
        raise ValueError("--raw cannot be combined with --image: a raw prompt has no place for images")
    if args.raw and args.system_prompt is not None:
        raise ValueError("--raw cannot be combined with --system-prompt: a raw prompt has no chat template")
    leader = _join_tensor_parallel(args)
    folder, processor, overrides = _load(args)
    images = _images(args, folder)
    text = args.prompt
    if text == "-":
        text = leader.from_leader(sys.stdin.read() if leader.is_leader() else None) if leader else sys.stdin.read()
    inputs = (_ids(processor.tokenizer.encode(text)) if args.raw
              else _first_turn(processor, text, images, args.system_prompt))
    prompt_tokens = inputs["input_ids"].shape[1]
    _check_fits(prompt_tokens, folder)
    model = _load_model(folder, args)
    # The streamer itself shows drafts only where stdout is a terminal.
    display = None if args.json else _display(processor.tokenizer, not args.no_drafts)
    turn = _run_turn(model, inputs, None, display, overrides)
    if args.verbose:
        print(turn.summary(), file=sys.stderr)
    if args.json:
        print(json.dumps({
            "text": processor.decode(turn.answer, skip_special_tokens=True),
            "prompt_tokens": prompt_tokens,
            "token_ids": turn.answer,
            "tokens_per_forward": round(turn.tokens_per_forward, 2),
            "steps_per_canvas": turn.steps,
            "seconds": round(turn.seconds, 3),
            "tokens_per_second": round(turn.tokens_per_second, 2),
        }, ensure_ascii=False))


def _lines(interactive: bool):
    if not interactive:
        yield from (line.removesuffix("\n") for line in sys.stdin)
        return
    while True:
        try:
            yield input(">>> ")
        except EOFError:
            print()
            return


def cmd_chat(args) -> int:
    """Exits with 1 after a piped conversation in which a line was skipped as an unknown command."""
    leader = _join_tensor_parallel(args)
    folder, processor, overrides = _load(args)
    images = _images(args, folder)
    model = _load_model(folder, args)
    interactive = sys.stdin.isatty()
    lines = _lines(interactive)
    if leader:
        # Every rank acts on rank 0's lines, as rank 0 reads them.
        interactive = leader.from_leader(interactive)
        lines = leader.leader_lines(lines)
    display = _display(processor.tokenizer, interactive and not args.no_drafts)
    if interactive and (not leader or leader.is_leader()):
        print(CHAT_COMMANDS, file=sys.stderr)
    cache, answer, number, skipped = None, [], 0, False
    for line in lines:
        command = line.strip()
        if not command:
            continue
        if command == "/exit":
            break
        if command == "/help":
            print(CHAT_COMMANDS, file=sys.stderr)
            continue
        if command == "/reset":
            cache, answer = None, []
            if interactive:
                print("(new conversation)", file=sys.stderr)
            continue
        if command.startswith("/") and " " not in command:
            _report(ValueError(f"unknown command {command}, skipped: {CHAT_COMMANDS}"))
            skipped = True
            continue
        try:
            inputs = (_first_turn(processor, line, images, args.system_prompt) if cache is None
                      else _ids(_next_turn(processor, answer, line)))
            turn = _run_turn(model, inputs, cache, display, overrides)
        except ValueError as error:
            if not interactive:
                raise
            _report(error)
            continue
        cache, answer, number = turn.cache, turn.uncached, number + 1
        if args.verbose:
            print(f"turn {number}: {turn.summary()}", file=sys.stderr)
    return 1 if skipped and not interactive else 0


def _parameter_counts(config: DiffusionGemmaConfig, vision: VisionConfig | None) -> tuple[int, int, int]:
    """(text total, text active per token, vision) from the config alone: modules built on the meta device
    have shapes but no memory. Shared modules count once, so the tied embedding does too."""
    import torch

    from ..hf.modeling import DiffusionGemmaForBlockDiffusion
    from ..model.vision import VisionEmbedder, VisionTower

    text = config.text_config
    with torch.device("meta"):
        text_model = DiffusionGemmaForBlockDiffusion(dataclasses.replace(config, vision_config=None))
        vision_modules = [VisionTower(vision), VisionEmbedder(vision, text.hidden_size)] if vision else []
    total = sum(p.numel() for p in text_model.parameters())
    experts = sum(p.numel() for name, p in text_model.named_parameters() if ".experts." in name)
    active = total - experts * (text.num_experts - text.top_k_experts) // text.num_experts
    return total, active, sum(p.numel() for module in vision_modules for p in module.parameters())


def _quantized_bytes(config: DiffusionGemmaConfig, dtype: torch.dtype, vision_parameters: int) -> dict:
    """Bytes of the weights under each quantization scheme (None where the scheme does not fit the shapes);
    the vision tower and the weights quantization leaves keep `dtype`."""
    import torch

    from ..hf.modeling import DiffusionGemmaForBlockDiffusion
    from ..model.quantization import DEFAULT_INT4_GROUP, parse_scheme, quantized_bytes

    with torch.device("meta"):
        text_model = DiffusionGemmaForBlockDiffusion(dataclasses.replace(config, vision_config=None))
    sizes = {}
    for name in ("int8", f"int4-g{DEFAULT_INT4_GROUP}", "fp8"):
        try:
            sizes[name] = quantized_bytes(text_model, parse_scheme(name), dtype) + vision_parameters * dtype.itemsize
        except ValueError:
            sizes[name] = None
    return sizes


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n:,} ({n / size:.2f} {unit})"
    return f"{n:,}"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _describe(config: DiffusionGemmaConfig, dtype_name: str) -> dict:
    """What `info` shows, as `info --json` prints it; the table is made from this."""
    import torch

    from ..model.config import FULL, SLIDING
    from ..model.vision import VisionConfig

    text = config.text_config
    attention = {"query_heads": text.num_attention_heads}
    for layer_type, label in ((SLIDING, "sliding"), (FULL, "full")):
        of_type = [s for s in text.attention_shapes if s.layer_type == layer_type]
        attention[label] = {"key_value_heads": sorted({s.num_key_value_heads for s in of_type}),
                            "head_dim": of_type[0].head_dim} if of_type else None
    vision = VisionConfig.from_dict(config.vision_config) if config.vision_config is not None else None
    total, active, vision_total = _parameter_counts(config, vision)
    return {
        "layers": {"total": text.num_hidden_layers, "sliding": text.layer_types.count(SLIDING),
                   "full": text.layer_types.count(FULL)},
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "attention": attention,
        "experts": {"count": text.num_experts, "top_k": text.top_k_experts,
                    "intermediate_size": text.moe_intermediate_size},
        "canvas_length": config.canvas_length,
        "vocab_size": text.vocab_size,
        "sliding_window": text.sliding_window,
        "max_position_embeddings": text.max_position_embeddings,
        "vision_tower": {"layers": vision.num_hidden_layers, "hidden_size": vision.hidden_size,
                         "patch_size": vision.patch_size} if vision else None,
        "parameters": {"total": total + vision_total, "text": total, "vision": vision_total,
                       "active_per_token": active},
        "weights": {"dtype": dtype_name, "bytes": (total + vision_total) * getattr(torch, dtype_name).itemsize},
        "quantized_weights": _quantized_bytes(config, getattr(torch, dtype_name), vision_total),
    }


def cmd_info(args) -> None:
    from ..model.config import DiffusionGemmaConfig

    facts = _describe(DiffusionGemmaConfig.from_json_file(_config_file(args.model)), args.dtype)
    if args.json:
        print(json.dumps(facts))
        return
    layers, experts, vision, parameters = facts["layers"], facts["experts"], facts["vision_tower"], facts["parameters"]
    attention = [f"{facts['attention']['query_heads']} query heads"]
    for label in ("sliding", "full"):
        shape = facts["attention"][label]
        if shape:
            kv = "/".join(map(str, shape["key_value_heads"]))
            attention.append(f"{label} layers: KV heads {kv}, head dim {shape['head_dim']}")
    rows = [
        ("layers", f"{layers['total']} ({layers['sliding']} sliding, {layers['full']} full)"),
        ("hidden size", f"{facts['hidden_size']} (dense MLP {facts['intermediate_size']})"),
        ("attention", "; ".join(attention)),
        ("experts", f"{experts['count']}, top-{experts['top_k']} per token "
                    f"(expert MLP {experts['intermediate_size']})"),
        ("canvas length", facts["canvas_length"]),
        ("vocabulary", facts["vocab_size"]),
        ("sliding window", facts["sliding_window"]),
        ("max positions", facts["max_position_embeddings"]),
        ("vision tower", f"{_plural(vision['layers'], 'layer')}, hidden {vision['hidden_size']}, "
                         f"patch {vision['patch_size']}" if vision else "none"),
        ("parameters", f"{_count(parameters['total'])} total"),
        ("  text", _count(parameters["text"])),
        ("  vision", _count(parameters["vision"])),
        ("  active per token", f"{_count(parameters['active_per_token'])} "
                               f"(top-{experts['top_k']} of {experts['count']} experts)"),
        (f"weights in {args.dtype}", _bytes(facts["weights"]["bytes"])),
    ]
    rows += [(f"  quantized {scheme}", _bytes(size) if size is not None else "does not fit these shapes")
             for scheme, size in facts["quantized_weights"].items()]
    for name, value in rows:
        print(f"{name + ':':<22}{value}")


def cmd_init_random(args) -> None:
    from ..hf.presets import write_random_checkpoint

    write_random_checkpoint(args.out, args.preset, args.seed)
    print(f"wrote a random-weights '{args.preset}' checkpoint to {args.out}; it writes gibberish and exists to "
          "try the commands offline")


def cmd_serve(args) -> None:
    try:
        from ..serving.server import serve, served_name
    except ImportError as error:
        raise SystemExit(f"{PROG}: error: `serve` needs fastapi and uvicorn: pip install 'diffusiongemma[serve]' "
                         f"({error})") from None
    _join_tensor_parallel(args)
    serve(_checkpoint_folder(args.model), model_name=args.served_model_name or served_name(args.model),
          host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
          max_prompt_tokens=args.max_prompt_tokens, api_key=args.api_key, device=args.device, dtype=args.dtype,
          max_body_bytes=args.max_body_bytes, max_denoising_steps_limit=args.max_denoising_steps_limit,
          trust_request_chat_template=args.trust_request_chat_template, read_timeout=args.read_timeout,
          keep_alive_timeout=args.keep_alive_timeout, max_connections=args.max_connections,
          shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
          allowed_media_domains=tuple(args.allowed_media_domains), max_model_len=args.max_model_len,
          cuda_graphs=not args.no_cuda_graphs, tensor_parallel=args.tensor_parallel is not None,
          quantization=args.quantization)


def cmd_train(args) -> None:
    from ..distributed.runtime import is_leader
    from ..training.trainer import TrainingConfig, train

    result = train(TrainingConfig.from_yaml(args.recipe), resume=args.resume, overwrite=args.overwrite)
    if not is_leader():
        return
    final = result["evaluations"][-1] if result["evaluations"] else None
    print(json.dumps({"steps": len(result["history"]), "final_loss": result["history"][-1]["diffusion_loss"],
                      "evaluation": final}))


def _add_serve_command(commands) -> None:
    serve = commands.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                                description="Serve /v1/chat/completions, /v1/completions and /v1/models, with "
                                            "/health and Prometheus /metrics. Requests are denoised side by side, "
                                            "one decoder pass per step for all of them; streamed answers arrive "
                                            "a canvas at a time.")
    serve.add_argument("model", metavar="MODEL", help="checkpoint folder or Hugging Face Hub id")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--max-batch", type=int, default=8, metavar="N",
                       help="requests denoised side by side (default: 8)")
    serve.add_argument("--max-queue", type=int, default=64, metavar="N",
                       help="requests that may wait for a place in the batch; more get 429 (default: 64)")
    serve.add_argument("--max-model-len", type=int, metavar="N",
                       help="the most tokens a request may hold, prompt and answer; on CUDA each of the --max-batch "
                            "requests has a cache that long, made at start (default: the model's positions, on CUDA "
                            "at most 16384)")
    serve.add_argument("--no-cuda-graphs", action="store_true",
                       help="on CUDA too, run every pass eagerly over a cache per request, as on the CPU")
    serve.add_argument("--max-prompt-tokens", type=int, metavar="N",
                       help="longer prompts get 400 (default: --max-model-len less one)")
    serve.add_argument("--served-model-name", metavar="NAME",
                       help="the model's name in the API (default: the checkpoint folder's name, or the Hub id)")
    serve.add_argument("--api-key", metavar="KEY", default=os.environ.get("DIFFUSIONGEMMA_API_KEY") or None,
                       help="require 'Authorization: Bearer KEY' on the /v1/ and tokenizer endpoints "
                            "(default: $DIFFUSIONGEMMA_API_KEY, which keeps the key out of the process list)")
    serve.add_argument("--max-body-bytes", type=int, default=4 * 2**20, metavar="N",
                       help="larger request bodies get 413 (default: 4 MiB)")
    serve.add_argument("--max-denoising-steps-limit", type=int, metavar="N",
                       help="requests asking more denoising steps per canvas get 400 (default: 4 times the "
                            "checkpoint's)")
    serve.add_argument("--trust-request-chat-template", action="store_true",
                       help="honour a request's own `chat_template`, which then runs on the server")
    serve.add_argument("--allowed-media-domains", nargs="+", default=(), metavar="HOST",
                       help="hosts whose http(s) image URLs a request may give (default: none; data: URLs always)")
    serve.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="a request's head, and then its body, must arrive within this time (default: 30)")
    serve.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="SECONDS",
                       help="an idle connection closes after this time (default: 5)")
    serve.add_argument("--max-connections", type=int, default=512, metavar="N",
                       help="connections open at once; more are closed at once (default: 512)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGTERM or Ctrl-C, answers in flight get this long, then end with an error "
                            "saying why (default: 30)")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                       help="the server's log, on stderr (default: info)")
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: CUDA when available (default)")
    serve.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                       help="dtype of the weights; auto: the checkpoint's (default)")
    serve.add_argument("--tensor-parallel", type=int, metavar="N",
                       help="shard the model over the N processes of a torchrun job (torchrun --nproc-per-node N "
                            "-m diffusiongemma serve ...); rank 0 serves HTTP (see docs/distributed.md)")
    _add_quantization(serve)
    serve.set_defaults(run=cmd_serve)


def _add_quantization(group) -> None:
    group.add_argument("--quantization", metavar="SCHEME",
                       help="quantize the weights as they load: int8, int4 (int4-gN: groups of N inputs, default "
                            "32) or fp8 (CUDA, compute capability 8.9+); `info` shows what each needs")


def _generation_options() -> argparse.ArgumentParser:
    options = _Parser(add_help=False)
    group = options.add_argument_group("generation (options left out keep the checkpoint's generation_config.json)")
    group.add_argument("--max-new-tokens", type=int, metavar="N",
                       help="tokens to generate at most; whole canvases are kept, so an answer may run longer")
    group.add_argument("--max-denoising-steps", type=int, metavar="N", help="denoising steps per canvas at most")
    group.add_argument("--entropy-bound", type=float, metavar="X",
                       help="entropy summed over the tokens accepted in one step; higher accepts more per step")
    group.add_argument("--t-min", type=float, metavar="T", help="sampling temperature at the last step")
    group.add_argument("--t-max", type=float, metavar="T", help="sampling temperature at the first step")
    group.add_argument("--temperature", type=_temperature, metavar="X",
                       help="scales both ends of the temperature schedule (--t-min and --t-max, or the "
                            "checkpoint's); lower is more predictable; must be > 0")
    group.add_argument("--stability-threshold", type=int, metavar="N",
                       help="a canvas may stop early once its argmax has not changed for N steps ...")
    group.add_argument("--confidence-threshold", type=float, metavar="X",
                       help="... and the mean entropy of its tokens is below X")
    group.add_argument("--no-adaptive-stopping", action="store_true",
                       help="give every canvas all its denoising steps")
    group.add_argument("--seed", type=int, metavar="N", help="seed of the sampler, for repeatable output")
    group.add_argument("--system-prompt", metavar="TEXT",
                       help="a system message for the chat template, sent with the first message (of each "
                            "conversation, in chat)")
    run = options.add_argument_group("running")
    run.add_argument("--device", default="auto", metavar="DEVICE",
                     help="a torch device: cpu, cuda, cuda:1, mps, ...; auto: CUDA when available (default)")
    run.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                     help="dtype of the weights; auto: the checkpoint's (default)")
    run.add_argument("--tensor-parallel", type=int, metavar="N",
                     help="shard the model over the N processes of a torchrun job (torchrun --nproc-per-node N "
                          "-m diffusiongemma ...); rank 0 prints (see docs/distributed.md)")
    _add_quantization(run)
    run.add_argument("--no-drafts", action="store_true",
                     help="on a terminal, show committed text only, not each step's draft (a pipe never gets "
                          "drafts)")
    run.add_argument("--verbose", "-v", action="store_true",
                     help="after each answer, print on stderr how many tokens were encoded and generated, and how fast")
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Run DiffusionGemma block-diffusion language models.")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    generation = _generation_options()

    generate = commands.add_parser("generate", parents=[generation], help="answer one prompt",
                                   usage="%(prog)s [options] [MODEL] PROMPT",
                                   description="Answer one prompt, streaming the text as canvases are committed.")
    generate.add_argument("model_and_prompt", nargs="+", metavar="[MODEL] PROMPT",
                          help="checkpoint folder or Hugging Face Hub id (default: the demo model that ships with "
                               "the package), then the user's message (- reads it from stdin)")
    generate.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                          help="an image the message is about, placed before its text; repeat for several "
                               "(needs a checkpoint with a vision tower)")
    generate.add_argument("--raw", action="store_true",
                          help="tokenize PROMPT as it is (after the tokenizer's BOS), without the chat template "
                               "(and without images or a system prompt)")
    generate.add_argument("--json", action="store_true",
                          help="print one JSON object: text, token ids, tokens per forward, steps per canvas, "
                               "seconds and tokens per second")
    generate.set_defaults(run=cmd_generate)

    chat = commands.add_parser("chat", parents=[generation], help="talk with a model, turn after turn",
                               description="Multi-turn chat; each turn reuses the key/value cache of the earlier "
                                           "ones. Reads one message per line; /reset starts a new conversation, "
                                           "/help lists the commands, /exit quits. From a pipe, only the answers "
                                           "are printed, and a line that is an unknown command is reported on "
                                           "stderr and skipped (the exit status is then 1).")
    chat.add_argument("model", metavar="MODEL", nargs="?", default=str(DEMO_MODEL),
                      help="checkpoint folder or Hugging Face Hub id (default: the demo model that ships with the "
                           "package)")
    chat.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                      help="an image placed before the text of the first message, and again after each /reset: "
                           "later turns only see it through the cache; repeat for several (needs a checkpoint "
                           "with a vision tower)")
    chat.set_defaults(run=cmd_chat)

    info = commands.add_parser("info", help="describe a checkpoint from its config.json",
                               description="Summarise a checkpoint's architecture, parameter counts and memory "
                                           "needs from its config.json, without loading the weights.")
    info.add_argument("model", metavar="MODEL", help="checkpoint folder or Hugging Face Hub id")
    info.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16",
                      help="dtype for the memory estimate, and of what quantization leaves (default: bfloat16)")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    info.set_defaults(run=cmd_info)

    init = commands.add_parser("init-random", help="write a random-weights checkpoint, to try the commands offline",
                               description="Write a checkpoint with random weights (a tiny vision tower included), "
                                           "a small tokenizer, a chat template and an image processor config. Its "
                                           "output is gibberish; it exists to try the commands.")
    init.add_argument("out", metavar="OUT", help="folder to create (must not exist, or be empty)")
    init.add_argument("--preset", choices=PRESET_NAMES, default="tiny", help="model size (default: tiny)")
    init.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    init.set_defaults(run=cmd_init_random)
    _add_serve_command(commands)

    train = commands.add_parser("train", help="train or fine-tune a model from a YAML recipe",
                                description="Block-diffusion training from a YAML recipe (see the README): "
                                            "checkpoints go to OUTPUT/checkpoint-STEP, the trained model to "
                                            "OUTPUT/final.")
    train.add_argument("recipe", metavar="RECIPE.yaml", help="the training recipe")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in the recipe's output folder")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an earlier run's checkpoints and final model in the output folder")
    train.set_defaults(run=cmd_train)
    return parser


def _report(error: BaseException) -> None:
    message = " ".join(str(error).split()) or type(error).__name__
    # In a torchrun job every rank may fail: say which one did.
    where = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
    print(f"{PROG}: error{where}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except BrokenPipeError:
        # The reader left (`| head`): say nothing, and keep the interpreter's final flush from failing too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as error:
        if not isinstance(error, _user_errors()):
            raise
        _report(error)
        return 1
    finally:
        if getattr(args, "tensor_parallel", None) or args.run is cmd_train:
            from ..distributed import runtime

            runtime.stop()
