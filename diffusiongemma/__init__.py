"""diffusiongemma: a standalone engine for DiffusionGemma block-diffusion language models."""

from .cache import KVCache
from .config import DiffusionGemmaConfig, DiffusionGemmaTextConfig
from .generation import DiffusionGemmaGenerationConfig, DiffusionGemmaGenerationOutput
from .model import (
    DiffusionGemmaDecoderModel,
    DiffusionGemmaEncoderModel,
    DiffusionGemmaEncoderTextModel,
    DiffusionGemmaForBlockDiffusion,
    DiffusionGemmaModel,
    DiffusionGemmaPreTrainedModel,
)
from .sampler import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

__all__ = [
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
