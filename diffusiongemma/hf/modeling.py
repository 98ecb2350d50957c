"""The class `transformers` users load: the network with its LM head, plus the engine's `generate` and the
generation config that travels with a checkpoint."""

from __future__ import annotations

from ..engine.generate import DiffusionGemmaGenerationConfig, GenerationMixin
from ..model.config import DiffusionGemmaConfig
from ..model.network import BlockDiffusionLM


class DiffusionGemmaForBlockDiffusion(GenerationMixin, BlockDiffusionLM):
    """DiffusionGemma with its LM head and the block-diffusion `generate`."""

    def __init__(self, config: DiffusionGemmaConfig):
        super().__init__(config)
        self.generation_config = DiffusionGemmaGenerationConfig()
