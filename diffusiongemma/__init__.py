"""diffusiongemma: a standalone engine for DiffusionGemma block-diffusion language models.

The public names load on first use (PEP 562): `diffusiongemma --help` and the demo model's path must not
wait for torch to import.
"""

import importlib

_EXPORTS = {
    ".engine.generate": ("DiffusionGemmaGenerationConfig", "DiffusionGemmaGenerationOutput"),
    ".engine.sampler": ("EntropyBoundSampler", "EntropyBoundSamplerConfig", "LinearTemperatureScheduleLogitsProcessor",
                        "StableAndConfidentStoppingCriteria"),
    ".hf.image_processing": ("ImageProcessor",),
    ".hf.modeling": ("DiffusionGemmaForBlockDiffusion",),
    ".hf.processing": ("AutoProcessor", "DiffusionGemmaProcessor"),
    ".hf.streamers": ("BaseStreamer", "DiffusionIteratorStreamer", "StreamEvent", "TextDiffusionStreamer",
                      "TextIteratorStreamer", "TextStreamer"),
    ".hf.tokenizer": ("DiffusionGemmaTokenizer",),
    ".model.cache": ("KVCache",),
    ".model.config": ("DiffusionGemmaConfig", "DiffusionGemmaTextConfig"),
    ".model.network": ("DiffusionGemmaDecoderModel", "DiffusionGemmaEncoderModel", "DiffusionGemmaEncoderTextModel",
                       "DiffusionGemmaModel", "DiffusionGemmaPreTrainedModel"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
