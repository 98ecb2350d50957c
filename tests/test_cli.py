"""The `diffusiongemma` command, end to end: `python -m diffusiongemma` processes on a tiny random checkpoint
that `init-random` wrote. Only the many user-mistake cases call `main` in this process, to save a process
start each; two of them also run as processes."""

import fcntl
import io
import json
import math
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusiongemma.cli.main import PRESET_NAMES, main
from diffusiongemma.hf.presets import PRESETS
from diffusiongemma.hf.processing import AutoProcessor

CANVAS = 16  # the tiny preset's canvas length
PROMPT = "Why is the sky blue?"
# One thread per process: several of them run at once, and a tiny model gains nothing from more.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# Short answers: at most 3 canvases of at most 3 steps.
SHORT = ["--max-new-tokens", 40, "--max-denoising-steps", 3]
SYSTEM = "Answer in one sentence."
TURN = re.compile(r"^turn (\d+): encoded (\d+) new tokens after (\d+) cached; generated (\d+) tokens in (\d+) canvases")


def run(*args, stdin: str | None = None, env: dict = ENV) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffusiongemma", *map(str, args)], input=stdin, env=env,
                          capture_output=True, text=True, timeout=300)


def run_all(commands: dict, env: dict = ENV) -> dict:
    """Runs {name: (args, stdin)} a few at a time; returns {name: completed process}."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run, *args, stdin=stdin, env=env) for name, (args, stdin) in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    result = ok(run("init-random", folder, "--preset", "tiny", "--seed", "0"))
    assert "gibberish" in result.stdout
    return folder


@pytest.fixture(scope="module")
def processor(checkpoint):
    return AutoProcessor.from_pretrained(checkpoint)


def template_ids(processor, message: str, images=(), system: str | None = None) -> list[int]:
    content = [*({"type": "image", "image": str(image)} for image in images), {"type": "text", "text": message}]
    conversation = [{"role": "system", "content": system}] if system else []
    return processor.apply_chat_template([*conversation, {"role": "user", "content": content}], tokenize=True,
                                         add_generation_prompt=True)[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Two noise images of different shapes, so that they cost different numbers of soft tokens."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for seed, shape in enumerate([(40, 60, 3), (90, 30, 3)]):
        pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
        paths.append(folder / f"image{seed}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def _partial_copy(source: Path, target: Path, without: str) -> Path:
    target.mkdir()
    for path in source.iterdir():
        if path.name != without:
            (target / path.name).symlink_to(path)
    return target


@pytest.fixture(scope="module")
def text_only(checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with the vision tower taken out of its config.json: enough for `info` and for
    refusing --image, which both stop before the weights load."""
    folder = _partial_copy(checkpoint, tmp_path_factory.mktemp("text-only") / "tiny", "config.json")
    config = json.loads((checkpoint / "config.json").read_text())
    del config["vision_config"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_init_random_writes_a_complete_checkpoint(checkpoint, processor):
    names = {path.name for path in checkpoint.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"} <= names
    tokenizer = processor.tokenizer
    config = json.loads((checkpoint / "config.json").read_text())
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    assert generation["pad_token_id"] == tokenizer.pad_token_id
    assert (config["boi_token_id"], config["eoi_token_id"], config["image_token_id"]) == (
        tokenizer.boi_token_id, tokenizer.eoi_token_id, tokenizer.image_token_id)
    assert config["canvas_length"] == CANVAS and config["text_config"]["vocab_size"] == 512
    # The image processor cuts the patches the tower reads, at the smallest soft-token budget.
    vision, image_processor = config["vision_config"], processor.image_processor
    assert (image_processor.patch_size, image_processor.pooling_kernel_size) == (
        vision["patch_size"], vision["pooling_kernel_size"])
    assert image_processor.max_soft_tokens == 70


def test_init_random_randomizes_the_vision_tower(checkpoint):
    tensors = {name: t for name, t in load_file(checkpoint / "model.safetensors").items() if "vision" in name}
    norms = [t for name, t in tensors.items() if "norm" in name]
    (table,) = [t for name, t in tensors.items() if name.endswith("position_embedding_table")]
    assert norms and not any(bool((t == 1).all()) for t in norms)
    assert table.std() > 0.1, "every patch position has an embedding of its own"


@pytest.fixture(scope="module")
def json_runs(checkpoint, images, tmp_path_factory):
    """`generate --json` in several settings, run concurrently."""
    # A copy whose generation_config.json asks for one canvas of at most 2 steps.
    limited = tmp_path_factory.mktemp("limited")
    for path in checkpoint.iterdir():
        (limited / path.name).symlink_to(path)
    (limited / "generation_config.json").unlink()
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    (limited / "generation_config.json").write_text(json.dumps({**generation, "max_new_tokens": CANVAS,
                                                                "max_denoising_steps": 2}))
    flags = [*SHORT, "--json"]
    results = run_all({
        "seed 7": (["generate", checkpoint, PROMPT, *flags, "--seed", 7], None),
        "seed 8": (["generate", checkpoint, PROMPT, *flags, "--seed", 8], None),
        "one step": (["generate", checkpoint, PROMPT, *flags, "--stability-threshold", 0,
                      "--confidence-threshold", 100], None),
        "raw from stdin, all steps": (["generate", checkpoint, "-", "--raw", *flags, "--no-adaptive-stopping"],
                                      "The sky is"),
        "checkpoint settings": (["generate", limited, PROMPT, "--json"], None),
        "plain": (["generate", checkpoint, PROMPT, *SHORT, "--seed", 7], None),
        "one image": (["generate", checkpoint, PROMPT, *flags, "--seed", 7, "--image", images[0]], None),
        "two images": (["generate", checkpoint, PROMPT, *flags, "--seed", 7, "--image", images[0],
                        "--image", images[1]], None),
        # The tiny preset's schedule runs from t_max 0.8 to t_min 0.4: halved, and given outright (on the same
        # device, named otherwise).
        "half temperature": (["generate", checkpoint, PROMPT, *flags, "--seed", 7, "--temperature", 0.5,
                              "--device", "cpu:0"], None),
        "halved schedule": (["generate", checkpoint, PROMPT, *flags, "--seed", 7, "--t-min", 0.2, "--t-max", 0.4],
                            None),
        "system prompt": (["generate", checkpoint, PROMPT, *flags, "--seed", 7, "--system-prompt", SYSTEM], None),
    })
    return {name: ok(result) for name, result in results.items()}


def record(result) -> dict:
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, "--json prints exactly one line"
    return json.loads(lines[0])


def test_generate_json_numbers_agree(json_runs, processor):
    tokenizer = processor.tokenizer
    eos = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")}
    out = record(json_runs["seed 7"])
    assert set(out) == {"text", "prompt_tokens", "token_ids", "tokens_per_forward", "steps_per_canvas", "seconds",
                        "tokens_per_second"}
    ids, steps = out["token_ids"], out["steps_per_canvas"]
    assert out["prompt_tokens"] == len(template_ids(processor, PROMPT))
    assert len(steps) == math.ceil(len(ids) / CANVAS) and all(1 <= s <= 3 for s in steps)
    # Whole canvases are kept, so only an end-of-sequence token makes the answer shorter than 3 canvases.
    assert len(ids) == 3 * CANVAS or ids[-1] in eos
    # Each denoising step is one decoder pass; padding does not count as generated.
    non_pad = sum(token != tokenizer.pad_token_id for token in ids)
    assert out["tokens_per_forward"] == round(non_pad / sum(steps), 2)
    # Rounded to the millisecond and to hundredths: the rate was computed before the seconds were rounded.
    assert out["seconds"] == round(out["seconds"], 3) and out["tokens_per_second"] == round(out["tokens_per_second"], 2)
    # Both figures are rounded: the rate lies between what the rounded seconds' ends give.
    low, high = len(ids) / (out["seconds"] + 0.0005), len(ids) / max(out["seconds"] - 0.0005, 1e-9)
    assert low - 0.005 <= out["tokens_per_second"] <= high + 0.005
    assert out["text"] == processor.decode(ids, skip_special_tokens=True)


def test_generate_seed_decides_the_output(json_runs):
    first, other = record(json_runs["seed 7"]), record(json_runs["seed 8"])
    assert first["token_ids"] != other["token_ids"]
    # The plain run had seed 7 too.
    assert json_runs["plain"].stdout == first["text"] + "\n"


def test_generate_with_images(json_runs, processor, images):
    text, one, two = (record(json_runs[name]) for name in ("seed 7", "one image", "two images"))
    soft_tokens = [processor.image_processor([str(image)])["num_soft_tokens_per_image"][0] for image in images]
    assert soft_tokens[0] != soft_tokens[1] and max(soft_tokens) <= 70
    # Each image adds its soft tokens between a begin-of-image and an end-of-image token.
    assert one["prompt_tokens"] == text["prompt_tokens"] + soft_tokens[0] + 2
    assert two["prompt_tokens"] == text["prompt_tokens"] + sum(soft_tokens) + 4
    assert two["prompt_tokens"] == len(template_ids(processor, PROMPT, images))
    assert len({tuple(out["token_ids"]) for out in (text, one, two)}) == 3, "the images reach the model"


def test_generate_flags_reach_the_sampler(json_runs):
    assert set(record(json_runs["one step"])["steps_per_canvas"]) == {1}
    assert set(record(json_runs["raw from stdin, all steps"])["steps_per_canvas"]) == {3}


def test_temperature_scales_the_schedule(json_runs):
    halved, scaled, plain = (record(json_runs[name])["token_ids"] for name in
                             ("half temperature", "halved schedule", "seed 7"))
    assert halved == scaled and halved != plain


def test_system_prompt_goes_before_the_message(json_runs, processor):
    out = record(json_runs["system prompt"])
    assert out["prompt_tokens"] == len(template_ids(processor, PROMPT, system=SYSTEM))
    assert out["token_ids"] != record(json_runs["seed 7"])["token_ids"], "the model reads it"


def test_unset_flags_keep_the_checkpoint_settings(json_runs):
    out = record(json_runs["checkpoint settings"])
    assert len(out["steps_per_canvas"]) == 1 and out["steps_per_canvas"][0] <= 2
    assert len(out["token_ids"]) <= CANVAS


def test_generate_raw_prompt_skips_the_template(json_runs, processor):
    out = record(json_runs["raw from stdin, all steps"])
    assert out["prompt_tokens"] == len(processor.tokenizer.encode("The sky is"))


def test_generate_prints_plain_committed_text_to_a_pipe(json_runs):
    plain = json_runs["plain"]
    assert "\033" not in plain.stdout and plain.stderr == ""


def test_chat_reuses_the_cache_between_turns(checkpoint, processor):
    conversation = "Hello there\nTell me more\n/reset\nAgain\n/exit\nnever read\n"
    result = ok(run("chat", checkpoint, "--max-new-tokens", 32, "--max-denoising-steps", 2, "--seed", 1, "-v",
                    stdin=conversation))
    assert ">>>" not in result.stdout and "\033" not in result.stdout and result.stdout.strip()
    lines = result.stderr.splitlines()
    turns = [tuple(map(int, TURN.match(line).groups())) for line in lines]
    assert [t[0] for t in turns] == [1, 2, 3], "a piped chat prints no other noise, and stops at /exit"
    (_, encoded1, cached1, _, canvases1), (_, encoded2, cached2, _, _), (_, encoded3, cached3, _, _) = turns
    assert cached1 == 0 and encoded1 == len(template_ids(processor, "Hello there"))
    # The cache holds the first prompt and every canvas but the last; only the rest is encoded again.
    assert cached2 == encoded1 + (canvases1 - 1) * CANVAS
    assert encoded2 < cached2 + encoded2, "fewer tokens encoded than the whole conversation holds"
    # At most the last canvas, the closing of the model's turn and the new turn, whose BOS is not repeated.
    assert encoded2 <= CANVAS + 2 + len(template_ids(processor, "Tell me more")) - 1
    assert cached3 == 0 and encoded3 == len(template_ids(processor, "Again")), "/reset starts from nothing"


def test_chat_sends_the_images_with_the_first_message(checkpoint, processor, images, json_runs):
    conversation = f"{PROMPT}\nAnd then?\n/reset\n{PROMPT}\n"
    result = ok(run("chat", checkpoint, "--image", images[0], *SHORT, "--seed", 7, "-v", stdin=conversation))
    # The first turn is the one-image `generate` run, with the same seed: the same answer.
    assert result.stdout.startswith(record(json_runs["one image"])["text"] + "\n")
    turns = [tuple(map(int, TURN.match(line).groups())) for line in result.stderr.splitlines()]
    (_, encoded1, cached1, _, canvases1), (_, encoded2, cached2, _, _), (_, encoded3, cached3, _, _) = turns
    assert cached1 == 0 and encoded1 == len(template_ids(processor, PROMPT, images[:1]))
    # The second turn finds the image in the cache and encodes text tokens only.
    assert cached2 == encoded1 + (canvases1 - 1) * CANVAS
    assert encoded2 <= CANVAS + 2 + len(template_ids(processor, "And then?")) - 1
    assert (cached3, encoded3) == (0, encoded1), "after /reset the image comes with the first message again"


def test_chat_help_unknown_commands_and_system_prompt(checkpoint, processor):
    conversation = "Hello there\n/help\n/bogus\nTell me more\n/reset\nAgain\n"
    result = run("chat", checkpoint, "--system-prompt", SYSTEM, *SHORT, "--seed", 1, "-v", stdin=conversation)
    assert result.returncode == 1, "a skipped line is a mistake the exit status reports"
    lines = result.stderr.splitlines()
    assert lines[1] == "/reset starts a new conversation, /help lists these commands, /exit quits"
    assert lines[2] == ("diffusiongemma: error: unknown command /bogus, skipped: /reset starts a new conversation, "
                        "/help lists these commands, /exit quits")
    turns = [tuple(map(int, TURN.match(line).groups())) for line in lines[:1] + lines[3:]]
    assert [t[0] for t in turns] == [1, 2, 3], "the messages after the unknown command are answered"
    (_, encoded1, _, _, _), (_, _, cached2, _, _), (_, encoded3, cached3, _, _) = turns
    # The system message comes with the first message of each conversation, and only then.
    assert encoded1 == len(template_ids(processor, "Hello there", system=SYSTEM)) and cached2 >= encoded1
    assert (cached3, encoded3) == (0, len(template_ids(processor, "Again", system=SYSTEM)))


def _info(result) -> dict[str, str]:
    return dict(re.split(r":\s+", line.strip(), maxsplit=1) for line in ok(result).stdout.splitlines())


def _number(shown: str) -> int:
    return int(shown.split()[0].replace(",", ""))


def _reference_counts(config_path: Path) -> tuple[int, int, int]:
    """(text total, text active per token, vision) of the reference model built from the same config.json
    (which builds a default vision tower where the file has none: hence the separate counts)."""
    import transformers

    data = json.loads(config_path.read_text())
    data.pop("model_type")
    with torch.device("meta"):
        model = transformers.DiffusionGemmaForBlockDiffusion(transformers.DiffusionGemmaConfig(**data))
    named = dict(model.named_parameters())
    text = data["text_config"]
    experts = sum(p.numel() for name, p in named.items() if ".experts." in name)
    vision = sum(p.numel() for name, p in named.items() if "vision" in name)
    total = sum(p.numel() for p in named.values())
    active = total - vision - experts * (text["num_experts"] - text["top_k_experts"]) // text["num_experts"]
    return total - vision, active, vision


@pytest.fixture(scope="module")
def info_runs(checkpoint, text_only) -> dict[str, dict[str, str]]:
    # The console script, where installed, is what `pip install` puts on PATH: it must run the same `main`.
    script = shutil.which("diffusiongemma", path=os.path.dirname(sys.executable))
    vision_args = ["info", str(checkpoint), "--dtype", "float32"]
    with ThreadPoolExecutor(max_workers=3) as pool:
        text = pool.submit(run, "info", text_only)
        vision = (pool.submit(subprocess.run, [script, *vision_args], env=ENV, capture_output=True, text=True,
                              timeout=300) if script else pool.submit(run, *vision_args))
        as_json = pool.submit(run, *vision_args, "--json")
        return {"text": _info(text.result()), "vision": _info(vision.result()),
                "json": json.loads(ok(as_json.result()).stdout)}


def test_info_describes_the_architecture(info_runs):
    text, vision = info_runs["text"], info_runs["vision"]
    for shown in (text, vision):
        assert shown["layers"] == "4 (3 sliding, 1 full)"
        assert shown["attention"] == ("4 query heads; sliding layers: KV heads 2, head dim 16; "
                                      "full layers: KV heads 1, head dim 32")
        assert shown["experts"] == "8, top-2 per token (expert MLP 32)"
        assert (shown["canvas length"], shown["vocabulary"], shown["sliding window"]) == ("16", "512", "32")
    assert (text["vision tower"], vision["vision tower"]) == ("none", "1 layer, hidden 32, patch 4")


def test_info_counts_parameters_like_the_reference(info_runs, checkpoint, text_only):
    for shown, folder in ((info_runs["text"], text_only), (info_runs["vision"], checkpoint)):
        text_total, active, vision = _reference_counts(folder / "config.json")
        has_vision = json.loads((folder / "config.json").read_text()).get("vision_config") is not None
        assert (_number(shown["text"]), _number(shown["active per token"])) == (text_total, active)
        assert _number(shown["vision"]) == (vision if has_vision else 0)
        assert _number(shown["parameters"]) == _number(shown["text"]) + _number(shown["vision"])
    shown = info_runs["vision"]
    assert shown["weights in float32"] == f"{_number(shown['parameters']) * 4 / 2**20:.2f} MiB"


def test_info_json_holds_the_table_s_figures(info_runs):
    shown, facts = info_runs["vision"], info_runs["json"]
    parameters = facts["parameters"]
    assert [parameters[key] for key in ("total", "text", "vision", "active_per_token")] == [
        _number(shown[key]) for key in ("parameters", "text", "vision", "active per token")]
    assert facts["weights"] == {"dtype": "float32", "bytes": parameters["total"] * 4}
    assert facts["layers"] == {"total": 4, "sliding": 3, "full": 1}
    assert facts["attention"] == {"query_heads": 4, "sliding": {"key_value_heads": [2], "head_dim": 16},
                                  "full": {"key_value_heads": [1], "head_dim": 32}}
    assert facts["experts"] == {"count": 8, "top_k": 2, "intermediate_size": 32}
    assert facts["vision_tower"] == {"layers": 1, "hidden_size": 32, "patch_size": 4}
    assert (facts["canvas_length"], facts["vocab_size"], facts["max_position_embeddings"]) == (16, 512, 2048)


@pytest.fixture(scope="module")
def mistakes(checkpoint, images, text_only, tmp_path_factory) -> dict[str, list]:
    base = tmp_path_factory.mktemp("mistakes")
    no_config = _partial_copy(checkpoint, base / "no-config", "config.json")
    (base / "not-an-image.png").write_text("plain text")
    return {
        "missing folder": ["generate", base / "absent", "hi"],
        "no config.json": ["generate", no_config, "hi"],
        "no weights": ["chat", _partial_copy(checkpoint, base / "no-weights", "model.safetensors")],
        "no tokenizer.json": ["generate", _partial_copy(checkpoint, base / "no-tokenizer", "tokenizer.json"), "hi"],
        "info without config.json": ["info", no_config],
        "negative steps": ["generate", checkpoint, "hi", "--max-denoising-steps", -2],
        "t_max below the checkpoint's t_min": ["generate", checkpoint, "hi", "--t-max", 0.3],
        "t_max equal to t_min": ["chat", checkpoint, "--t-min", 0.5, "--t-max", 0.5],
        "zero entropy bound": ["generate", checkpoint, "hi", "--entropy-bound", 0],
        "conflicting stopping flags": ["generate", checkpoint, "hi", "--no-adaptive-stopping",
                                       "--confidence-threshold", 0.1],
        "cuda without cuda": ["generate", checkpoint, "hi", "--device", "cuda"],
        "prompt too long": ["generate", checkpoint, "hello world " * 1500],
        "unknown chat command": ["chat", checkpoint, "--max-denoising-steps", 1],
        "temperature 0": ["chat", checkpoint, "--temperature", 0],
        "negative temperature": ["generate", checkpoint, "hi", "--temperature", -1],
        "system prompt for a raw prompt": ["generate", checkpoint, "hi", "--raw", "--system-prompt", SYSTEM],
        "unknown device": ["generate", checkpoint, "hi", "--device", "gpu"],
        "second GPU of one": ["chat", checkpoint, "--device", "cuda:1"],
        "device torch was built without": ["generate", checkpoint, "hi", "--device", "ipu"],
        "meta device": ["generate", checkpoint, "hi", "--device", "meta"],
        "Hub id not in the cache": ["info", "nobody/no-such-checkpoint"],
        "unknown preset": ["init-random", base / "new", "--preset", "huge"],
        "output not empty": ["init-random", checkpoint],
        "not a number": ["generate", checkpoint, "hi", "--max-new-tokens", "many"],
        "no command": [],
        "raw prompt with an image": ["generate", checkpoint, "hi", "--raw", "--image", images[0]],
        "missing image": ["generate", checkpoint, "hi", "--image", base / "absent.png"],
        "unreadable image": ["chat", checkpoint, "--image", base / "not-an-image.png"],
        "image for a text-only checkpoint": ["generate", text_only, "hi", "--image", images[0]],
    }


ERRORS = {
    "missing folder": (1, "no checkpoint folder at"),
    "no config.json": (1, "is not a complete checkpoint: it has no config.json"),
    "no weights": (1, "is not a complete checkpoint: it has no model.safetensors"),
    "no tokenizer.json": (1, "is not a complete checkpoint: it has no tokenizer.json"),
    "info without config.json": (1, "no config.json in"),
    "negative steps": (1, "`max_denoising_steps` must be a positive integer, got -2"),
    "t_max below the checkpoint's t_min": (1, "`t_max` (0.3) must be greater than `t_min` (0.4)"),
    "t_max equal to t_min": (1, "`t_max` (0.5) must be greater than `t_min` (0.5)"),
    "zero entropy bound": (1, "`entropy_bound` must be a number > 0"),
    "conflicting stopping flags": (1, "--no-adaptive-stopping cannot be combined"),
    "cuda without cuda": (1, "no CUDA device is available"),
    "prompt too long": (1, "but the model has only 2048 positions"),
    "unknown chat command": (1, "unknown command /bogus, skipped: /reset starts a new conversation, /help lists"),
    "temperature 0": (2, "argument --temperature: must be > 0: generate and chat sample every token"),
    "negative temperature": (2, "argument --temperature: must be a number > 0, got '-1'"),
    "system prompt for a raw prompt": (1, "--raw cannot be combined with --system-prompt"),
    "unknown device": (1, "--device gpu: not a device torch knows"),
    "second GPU of one": (1, "--device cuda:1: this machine has 1 CUDA device(s), cuda:0 to cuda:0"),
    "device torch was built without": (1, "--device ipu is not available here"),
    "meta device": (1, "--device meta holds shapes but no values"),
    "Hub id not in the cache": (1, "nobody/no-such-checkpoint is neither a local folder nor in the Hugging Face "
                                   "cache"),
    "unknown preset": (2, "argument --preset: invalid choice: 'huge'"),
    "output not empty": (1, "already exists and is not an empty folder"),
    "not a number": (2, "argument --max-new-tokens: invalid int value: 'many'"),
    "no command": (2, "the following arguments are required: COMMAND"),
    "raw prompt with an image": (1, "--raw cannot be combined with --image"),
    "missing image": (1, "absent.png' is not an existing file"),
    "unreadable image": (1, "not-an-image.png: cannot identify image file"),
    "image for a text-only checkpoint": (1, "--image needs a checkpoint with a vision tower"),
}


def _check_one_line_error(case: str, status: int, stdout: str, stderr: str) -> None:
    expected_status, message = ERRORS[case]
    assert status == expected_status
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffusiongemma: error: "), stderr
    assert message in lines[0]


@pytest.mark.parametrize("case", ERRORS)
def test_user_mistakes_end_in_one_line(mistakes, case, capsys, monkeypatch):
    """Through `main` in this process: the same code a process runs, without paying for a start per case."""
    if case == "cuda without cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if case == "second GPU of one":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/bogus\n"))
    try:
        status = main([str(arg) for arg in mistakes[case]])
    except SystemExit as exit:  # argparse leaves through SystemExit, as it does in a process
        status = exit.code
    captured = capsys.readouterr()
    _check_one_line_error(case, status, captured.out, captured.err)


def test_user_mistakes_end_in_one_line_in_a_process(mistakes):
    cases = ("unknown preset", "t_max below the checkpoint's t_min")
    results = run_all({case: (mistakes[case], "/bogus\n") for case in cases})
    for case, result in results.items():
        _check_one_line_error(case, result.returncode, result.stdout, result.stderr)


def test_every_command_fails_fast_and_in_one_line_without_a_network(tmp_path):
    """No network (a Hub that refuses connections) and an empty cache: no retries, no Hub log lines."""
    env = {**{k: v for k, v in ENV.items() if k != "HF_HUB_OFFLINE"}, "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HOME": str(tmp_path)}
    hub_id = "google/diffusiongemma-26B-A4B-it"
    results = run_all({"info": (["info", hub_id], None), "generate": (["generate", hub_id, "hi"], None),
                       "chat": (["chat", hub_id], "hi\n"), "serve": (["serve", hub_id, "--port", 9], None)}, env=env)
    for name, result in results.items():
        assert result.returncode == 1 and result.stdout == "", name
        assert result.stderr == (f"diffusiongemma: error: {hub_id} is neither a local folder nor in the Hugging "
                                 "Face cache, and it could not be downloaded (offline mode or no network)\n"), name


def test_help_version_and_argument_errors_do_not_import_torch():
    code = """
import sys
from diffusiongemma.cli import main
for argv in (["--help"], ["generate", "--help"], ["--version"], ["generate", "--max-new-tokens", "many", "hi"]):
    try:
        main(argv)
    except SystemExit:
        pass
print("torch" in sys.modules, file=sys.stderr)
"""
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.stderr.splitlines()[-1] == "False"


def test_version_and_usage(capsys):
    for argv in (["--version"], ["generate", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"diffusiongemma {metadata.version('diffusiongemma')}"
    assert lines[1] == "usage: diffusiongemma generate [options] [MODEL] PROMPT"


def test_preset_names_are_the_presets():
    assert PRESET_NAMES == tuple(PRESETS)


def test_loading_shows_a_progress_bar_on_a_terminal(checkpoint):
    leader, follower = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, and a bar cut to that width is empty.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    command = [sys.executable, "-m", "diffusiongemma", "generate", str(checkpoint), PROMPT, *map(str, SHORT), "--json"]
    with subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=follower, text=True) as process:
        os.close(follower)
        terminal = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # every writer closed the terminal
                break
            if not chunk:
                break
            terminal += chunk
        out = process.stdout.read()
    os.close(leader)
    assert process.returncode == 0
    assert b"loading weights" in terminal
    assert json.loads(out)["token_ids"], "stdout holds the answer alone"
