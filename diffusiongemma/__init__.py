"""diffusiongemma: a standalone engine for DiffusionGemma block-diffusion language models."""

from .engine.generate import (
    DiffusionGemmaGenerationConfig,
    DiffusionGemmaGenerationOutput,
)
from .engine.sampler import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)
from .hf.image_processing import ImageProcessor
from .hf.modeling import DiffusionGemmaForBlockDiffusion
from .hf.processing import AutoProcessor, DiffusionGemmaProcessor
from .hf.streamers import (
    BaseStreamer,
    DiffusionIteratorStreamer,
    StreamEvent,
    TextDiffusionStreamer,
    TextIteratorStreamer,
    TextStreamer,
)
from .hf.tokenizer import DiffusionGemmaTokenizer
from .model.cache import KVCache
from .model.config import DiffusionGemmaConfig, DiffusionGemmaTextConfig
from .model.network import (
    DiffusionGemmaDecoderModel,
    DiffusionGemmaEncoderModel,
    DiffusionGemmaEncoderTextModel,
    DiffusionGemmaModel,
    DiffusionGemmaPreTrainedModel,
)

__all__ = [
    "AutoProcessor",
    "BaseStreamer",
    "DiffusionGemmaProcessor",
    "DiffusionGemmaTokenizer",
    "DiffusionIteratorStreamer",
    "ImageProcessor",
    "StreamEvent",
    "TextDiffusionStreamer",
    "TextIteratorStreamer",
    "TextStreamer",
    "DiffusionGemmaConfig",
    "DiffusionGemmaDecoderModel",
    "DiffusionGemmaEncoderModel",
    "DiffusionGemmaEncoderTextModel",
    "DiffusionGemmaForBlockDiffusion",
    "DiffusionGemmaGenerationConfig",
    "DiffusionGemmaGenerationOutput",
    "DiffusionGemmaModel",
    "DiffusionGemmaPreTrainedModel",
    "DiffusionGemmaTextConfig",
    "EntropyBoundSampler",
    "EntropyBoundSamplerConfig",
    "KVCache",
    "LinearTemperatureScheduleLogitsProcessor",
    "StableAndConfidentStoppingCriteria",
]
