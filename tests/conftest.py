"""Shared fixtures: tiny random DiffusionGemma checkpoints made with the reference implementation."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The fused kernels (`fused.py`) are Triton kernels for CUDA; Triton's interpreter runs them on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

TINY_TEXT = dict(
    vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, sliding_window=12,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    num_experts=8, top_k_experts=2, moe_intermediate_size=32, max_position_embeddings=4096,
    use_bidirectional_attention="vision",
)
TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=8, position_embedding_size=64, patch_size=4)


def tiny_model(canvas_length=4, **text):
    """A small randomly initialised model of our own (no reference needed), the same on every call."""
    from diffusiongemma import (
        DiffusionGemmaConfig,
        DiffusionGemmaForBlockDiffusion,
        DiffusionGemmaTextConfig,
    )

    text = {**dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, global_head_dim=16, sliding_window=6, num_experts=4,
                   top_k_experts=2, moe_intermediate_size=16), **text}
    torch.manual_seed(0)
    return DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(text_config=DiffusionGemmaTextConfig(**text),
                                                               canvas_length=canvas_length)).eval()


def served_texts(outcomes, timeout=30) -> list[str]:
    """The answer of each served request, from the queue its events go to (`scheduler.Request.emit`)."""
    from diffusiongemma.serving import scheduler

    texts = []
    for events in outcomes:
        while not isinstance(event := events.get(timeout=timeout), (scheduler.Finished, scheduler.Failed)):
            pass
        assert isinstance(event, scheduler.Finished), event
        texts.append(event.text)
    return texts


@torch.no_grad()
def randomize(model, seed=0):
    """The reference initialises norms and scales to one; random values make a wrong formula show."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point() or "inv_freq" in name or "embed_scale" in name:
            continue
        noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name or leaf in ("scale", "per_expert_scale", "layer_scalar"):
            tensor.copy_(1.0 + 0.2 * noise)
        elif "position_embedding_table" in name:
            tensor.copy_(noise)
        elif leaf in ("input_min", "output_min", "input_max", "output_max", "std_bias", "std_scale"):
            continue
        else:
            tensor.copy_(0.05 * noise)
    return model


def make_reference(text_overrides=None, canvas_length=8, vision=True, seed=0, image_token_ids=None):
    """A randomised reference model; `image_token_ids` = (boi, eoi, image), by default the top three ids."""
    from transformers import DiffusionGemmaConfig as RefConfig
    from transformers import DiffusionGemmaForBlockDiffusion as RefModel

    text = {**TINY_TEXT, **(text_overrides or {})}
    boi, eoi, image = image_token_ids or (text["vocab_size"] - 3, text["vocab_size"] - 2, text["vocab_size"] - 1)
    config = RefConfig(text_config=text, vision_config=TINY_VISION if vision else None, canvas_length=canvas_length,
                       image_token_id=image, boi_token_id=boi, eoi_token_id=eoi)
    torch.manual_seed(seed)
    model = RefModel(config).eval()
    return randomize(model, seed)


@pytest.fixture(scope="session")
def tokenizer_folder(tmp_path_factory):
    """A folder holding the project-made tokenizer (512 ids) and its chat template."""
    from diffusiongemma.hf.chat_fixture import write_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder, 512)
    return folder


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory):
    """(reference model, folder it was saved to) for the default tiny config."""
    folder = tmp_path_factory.mktemp("tiny")
    model = make_reference()
    model.save_pretrained(folder)
    return model, str(folder)


def reference_processor(tokenizer, folder):
    """The reference's Gemma4Processor for text and images. Built directly, since its audio and video
    processors need torchvision; the chat template comes from the fixture folder."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import (
        Gemma4ImageProcessorPil,
    )
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    class TextAndImages(Gemma4Processor):
        def check_argument_for_proper_class(self, name, argument):
            return None if argument is None else super().check_argument_for_proper_class(name, argument)

    template = (folder / "chat_template.jinja").read_text()
    processor = TextAndImages(None, Gemma4ImageProcessorPil(), tokenizer, None, chat_template=template)
    processor.boa_token = processor.eoa_token = "<audio-unused>"  # only checked to exist
    return processor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A `tiny` random checkpoint written by `init-random`'s code (the server tests' model)."""
    from diffusiongemma.hf.presets import write_random_checkpoint

    folder = tmp_path_factory.mktemp("tiny-random")
    write_random_checkpoint(folder, "tiny", seed=0)
    return str(folder)


@pytest.fixture(scope="module")
def tiny(checkpoint):
    """(model, processor) of the tiny checkpoint. Torch gets one thread: the server shares the cores
    with the test's clients, and a tiny model gains nothing from more."""
    from diffusiongemma import AutoProcessor, DiffusionGemmaForBlockDiffusion

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint).eval(), AutoProcessor.from_pretrained(checkpoint)
    torch.set_num_threads(threads)
