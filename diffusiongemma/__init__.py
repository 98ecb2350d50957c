"""diffusiongemma: a standalone engine for DiffusionGemma block-diffusion language models."""

from .cache import KVCache
from .config import DiffusionGemmaConfig, DiffusionGemmaTextConfig
from .generation import DiffusionGemmaGenerationConfig, DiffusionGemmaGenerationOutput
from .image_processing import ImageProcessor
from .model import (
    DiffusionGemmaDecoderModel,
    DiffusionGemmaEncoderModel,
    DiffusionGemmaEncoderTextModel,
    DiffusionGemmaForBlockDiffusion,
    DiffusionGemmaModel,
    DiffusionGemmaPreTrainedModel,
)
from .processing import AutoProcessor, DiffusionGemmaProcessor
from .sampler import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)
from .streamers import (
    BaseStreamer,
    DiffusionIteratorStreamer,
    StreamEvent,
    TextDiffusionStreamer,
    TextIteratorStreamer,
    TextStreamer,
)
from .tokenizer import DiffusionGemmaTokenizer

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
