"""Drop-in for `transformers` code: the reference's own usage examples (its docstrings) run against this
package with only their import line changed, on a tiny random model stored in a Hugging Face cache under
the released model's id; and the `from_pretrained` arguments `transformers` code passes (`device_map`,
`torch_dtype`)."""

import io
import json
import textwrap

import pytest
import torch

from diffusiongemma import DiffusionGemmaForBlockDiffusion

MODEL_ID = "google/diffusiongemma-26B-A4B-it"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Hugging Face cache that holds a tiny random checkpoint (tokenizer, chat template and image processor
    included) as the released model's main revision; (cache, the checkpoint's folder)."""
    from diffusiongemma.hf.presets import write_random_checkpoint

    cache = tmp_path_factory.mktemp("hub")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{MODEL_ID.replace('/', '--')}"
    write_random_checkpoint(repo / "snapshots" / commit, "tiny")
    # Few denoising steps per canvas: the examples ask for up to 512 tokens, and the model is random anyway.
    generation = repo / "snapshots" / commit / "generation_config.json"
    generation.write_text(json.dumps({**json.loads(generation.read_text()), "max_denoising_steps": 4}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache, repo / "snapshots" / commit


@pytest.fixture
def hub(checkpoint, monkeypatch):
    import huggingface_hub.constants

    cache, _ = checkpoint
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def doc_example(docstring: str) -> str:
    """The docstring's ```python example as a script: the prompts (`>>> `, `... `) stripped, shown results
    dropped, and its one import from `transformers` made an import from `diffusiongemma`."""
    block = textwrap.dedent(docstring.split("```python", 1)[1].split("```", 1)[0])
    lines = [line[4:] for line in block.splitlines() if line.startswith((">>> ", "... "))]
    code = "\n".join(lines)
    assert code.count("from transformers import") == 1 and code.count("transformers") == 1, code
    return code.replace("from transformers import", "from diffusiongemma import")


def test_the_generate_example_runs(hub, capsys):
    """`generate`'s example: `device_map="auto"`, a chat without a generation prompt, a streamer."""
    from transformers import DiffusionGemmaForBlockDiffusion as Reference

    code = doc_example(Reference.generate.__doc__)
    assert 'device_map="auto"' in code and "max_new_tokens=512, streamer=streamer" in code
    namespace = {}
    exec(compile(code, "generate example", "exec"), namespace)
    assert isinstance(namespace["model"], DiffusionGemmaForBlockDiffusion)
    assert namespace["model"].device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert namespace["input_ids"].shape[0] == 1
    assert capsys.readouterr().out.strip()  # the streamer printed the text as it was generated


def test_the_forward_example_runs_but_for_its_last_line(hub, monkeypatch):
    """`forward`'s example: an image by URL, `return_dict=True` inputs passed whole to `generate`. Its last
    line decodes the object `generate` returns instead of its `sequences`, which fails in `transformers`
    too; decoding `.sequences` works."""
    from PIL import Image
    from transformers import DiffusionGemmaForBlockDiffusion as Reference

    import diffusiongemma.hf.image_processing

    code = doc_example(Reference.forward.__doc__)
    body, last = code.rsplit("\n", 1)
    assert last == "processor.batch_decode(generate_ids, skip_special_tokens=True)[0]"
    url = ("https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/"
           "pipeline-cat-chonk.jpeg")
    assert url in body
    picture = io.BytesIO()
    Image.new("RGB", (96, 64), (180, 120, 40)).save(picture, format="JPEG")
    fetched = []
    # No network here: the URL's download answers with a picture of our own.
    monkeypatch.setattr(diffusiongemma.hf.image_processing, "_download",
                        lambda asked, *args, **kwargs: fetched.append(asked) or picture.getvalue())

    namespace = {}
    exec(compile(body, "forward example", "exec"), namespace)
    assert fetched == [url]
    assert namespace["inputs"]["pixel_values"].shape[0] == 1
    sequences = namespace["generate_ids"].sequences
    assert sequences.shape[1] > namespace["inputs"]["input_ids"].shape[1]
    with pytest.raises(Exception):
        exec(last, namespace)
    text = namespace["processor"].batch_decode(sequences, skip_special_tokens=True)[0]
    assert isinstance(text, str) and text


def test_the_config_example_cannot_run_here():
    """The config's example imports `Gemma4VisionConfig`, which this package does not have (a vision config
    is a plain mapping here), and builds the full 26B model from the default configs."""
    from transformers import DiffusionGemmaConfig as Reference

    code = doc_example(Reference.__doc__)
    assert "Gemma4VisionConfig()" in code and "DiffusionGemmaModel(configuration)" in code
    with pytest.raises(ImportError, match="Gemma4VisionConfig"):
        exec(compile(code, "config example", "exec"), {})


# --- device_map and torch_dtype ---------------------------------------------------------------------------


@pytest.mark.parametrize("device_map", ["auto", "cpu", {"": "cpu"}, {"model": "cpu"}, torch.device("cpu")])
def test_a_device_map_that_names_one_device_is_accepted(checkpoint, monkeypatch, device_map):
    _, folder = checkpoint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, device_map=device_map)
    assert model.device == torch.device("cpu")


@pytest.mark.parametrize("device_map", ["cuda", "cuda:0", 0, {"": 0}, {"": "cuda:0"}, {"model": 1}])
def test_a_device_map_that_names_a_gpu_asks_for_cuda(checkpoint, monkeypatch, device_map):
    _, folder = checkpoint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="^CUDA was asked for, but no CUDA device is available$"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(folder, device_map=device_map)


@pytest.mark.parametrize("arguments, message", [
    (dict(device_map={"model.encoder": 0, "model.decoder": "cpu"}),
     r"device_map \{'model.encoder': 0, 'model.decoder': 'cpu'\} splits the model across \['cpu', 'cuda:0'\]; "
     r"this engine runs a model on one device"),
    (dict(device_map={"model.encoder": 0, "model.decoder": 1}), r"splits the model across \['cuda:0', 'cuda:1'\]"),
    (dict(device_map="balanced"), r"device_map 'balanced' spreads the model over several devices or offloads it"),
    (dict(device_map={"": 0, "model.decoder": "disk"}), r"spreads the model over several devices or offloads it"),
    (dict(device_map={}), r"`device_map` is an empty mapping"),
    (dict(device_map="cpu", device="cpu"), r"pass `device` or `device_map`, not both"),
    (dict(device_map="tpu"), r"unknown device 'tpu'; use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (dict(dtype="float32", torch_dtype="float32"), r"pass `dtype` or its old name `torch_dtype`, not both"),
    (dict(low_cpu_mem_usage=True), r"unknown from_pretrained arguments \['low_cpu_mem_usage'\]"),
])
def test_what_cannot_be_honoured_is_refused_by_name(checkpoint, monkeypatch, arguments, message):
    _, folder = checkpoint
    # CUDA as if there were GPUs, so that what is refused is the map itself.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=message):
        DiffusionGemmaForBlockDiffusion.from_pretrained(folder, **arguments)


@pytest.mark.parametrize("torch_dtype, expected", [(torch.bfloat16, torch.bfloat16), ("float16", torch.float16),
                                                   ("auto", torch.float32)])
def test_torch_dtype_is_the_old_name_of_dtype(checkpoint, torch_dtype, expected):
    _, folder = checkpoint
    # The preset is stored in float32.
    assert DiffusionGemmaForBlockDiffusion.from_pretrained(folder, torch_dtype=torch_dtype).dtype == expected
