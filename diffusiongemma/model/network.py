"""The DiffusionGemma network: one Gemma-4 mixture-of-experts transformer used two ways.

The encoder runs it causally over committed tokens and writes the key/value cache; the decoder runs it
bidirectionally over a canvas that attends to the cached prefix, and reads the cache only. Both use the
same `TextBackbone` and therefore the same weights; only the per-layer output scalars are kept apart,
because the checkpoint stores them separately for the two roles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kernels import fused
from .cache import KVCache, RequestCaches, check_cache, check_mask
from .config import FULL, SLIDING, DiffusionGemmaConfig, DiffusionGemmaTextConfig
from .layers import (
    RMSNorm,
    RotaryEmbedding,
    TokenEmbedding,
    TransformerLayer,
    activation,
    rms_norm,
)
from .vision import VisionConfig, VisionEmbedder, VisionTower, embed_images


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap) of float32 `logits` (unchanged for a cap of None). In place where autograd
    keeps no intermediates: two vocabulary-sized temporaries fewer per step."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap if logits.requires_grad else logits.div_(cap).tanh_().mul_(cap)


class TextBackbone(nn.Module):
    """Embeddings, layers and final norm shared by the encoder and the decoder."""

    def __init__(self, config: DiffusionGemmaTextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = TokenEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerLayer(config, s) for s in config.attention_shapes)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size ** 0.5), persistent=False)

    def reset_computed_buffers(self) -> None:
        """Recomputes what is derived from the config rather than stored (after loading into empty memory)."""
        device = self.embed_tokens.weight.device
        self.rotary.reset(device)
        self.register_buffer("embed_scale", torch.tensor(self.config.hidden_size ** 0.5, device=device),
                             persistent=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embed_scale.to(self.embed_tokens.weight.dtype)

    def encode(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache,
        attention_mask: torch.Tensor | None,
        block_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal pass over new tokens; the cache stores their keys and values (see its
        `encoder_attention`)."""
        attends = cache.encoder_attention(self.config, hidden.shape[1], attention_mask, block_ids, hidden.device)
        return self._run(hidden, positions, attends, decoder=False)

    def decode(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Bidirectional pass over the canvas, attending to the cached prefix; the cache is not extended."""
        return self._run(hidden, positions, cache.decoder_attention(attention_mask), decoder=True)

    def _run(self, hidden: torch.Tensor, positions: torch.Tensor, attends, decoder: bool) -> torch.Tensor:
        rope = {t: self.rotary(positions, t, hidden.dtype) for t in (SLIDING, FULL) if t in self.config.layer_types}
        for layer, attend in zip(self.layers, attends):
            scalar = layer.decoder_layer_scalar if decoder else layer.encoder_layer_scalar
            hidden = layer(hidden, *rope[layer.layer_type], attend, scalar)
        return self.norm(hidden)


class SelfConditioning(nn.Module):
    """Feeds the previous denoising step's prediction back into the canvas embeddings."""

    def __init__(self, config: DiffusionGemmaTextConfig):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.pre_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = activation(config)

    def forward(self, canvas_embeds: torch.Tensor, soft_embeds: torch.Tensor | None) -> torch.Tensor:
        # Without a signal (first step) the MLP of zeros is exactly zero; skip it.
        if soft_embeds is not None:
            normed = self.pre_norm(soft_embeds)
            canvas_embeds = canvas_embeds + self.down_proj(self.act(self.gate_proj(normed)) * self.up_proj(normed))
        return rms_norm(canvas_embeds, None, self.eps)


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor
    past_key_values: KVCache


@dataclass
class DecoderOutput:
    last_hidden_state: torch.Tensor


@dataclass
class BlockDiffusionOutput:
    logits: torch.Tensor
    past_key_values: KVCache
    last_hidden_state: torch.Tensor
    encoder_last_hidden_state: torch.Tensor | None = None


class DiffusionGemmaPreTrainedModel(nn.Module):
    """Base of every DiffusionGemma module: holds the config, loads and saves checkpoints."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @classmethod
    def from_pretrained(cls, path_or_repo_id, **kwargs):
        """Loads a checkpoint folder or Hugging Face repo id.

        `dtype` ("auto", the default: the checkpoint's; or a float dtype or its name; `torch_dtype` is its old
        name); `device` ("cpu", the default; "auto": CUDA where there is one; "cuda:N") or instead
        `transformers`' `device_map` where it names one device ("auto", "cuda:0", {"": 0}): the model is
        never split; `adapter`: a folder or repo id with a LoRA adapter in PEFT's layout, folded into the
        weights as they load; `tp_plan="auto"`: under torchrun, shard the model over the job's ranks for
        tensor- and expert-parallel inference, each rank reading only its own shards (docs/distributed.md);
        `sharding`: a function that shards the model, built on the meta device, in place before its weights
        are read (FSDP2, `distributed/fsdp.py`); `quantization`: "int8", "int4" ("int4-gN" for groups of N
        inputs) or "fp8" (a CUDA GPU of compute capability 8.9+), the weights quantized as they are read
        (`model.quantization`), None (the default) for none, unless the checkpoint stores quantized weights;
        and hub arguments such as `revision` or `cache_dir`."""
        from ..hf.loading import load_pretrained

        if not issubclass(cls, (DiffusionGemmaModel, BlockDiffusionLM)):
            raise ValueError(f"a checkpoint holds the whole model; load it with DiffusionGemmaForBlockDiffusion "
                             f"or DiffusionGemmaModel, not {cls.__name__}")
        return load_pretrained(cls, path_or_repo_id, **kwargs)

    def save_pretrained(self, folder, **kwargs) -> None:
        from ..hf.loading import save_pretrained

        save_pretrained(self, folder, **kwargs)


class DiffusionGemmaEncoderTextModel(DiffusionGemmaPreTrainedModel):
    """The backbone in its encoder role: causal over new tokens, appending them to the cache."""

    def __init__(self, config: DiffusionGemmaTextConfig, backbone: TextBackbone | None = None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else TextBackbone(config)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        block_ids: torch.Tensor | None = None,
    ) -> EncoderOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
        if inputs_embeds is None:
            inputs_embeds = self.backbone.embed(input_ids)
        batch, count = inputs_embeds.shape[:2]
        check_cache(past_key_values, batch)
        cache = past_key_values if past_key_values is not None else KVCache(self.config)
        seen = cache.get_seq_length()
        if position_ids is None:
            position_ids = torch.arange(seen, seen + count, device=inputs_embeds.device)[None]
        attention_mask = check_mask("attention_mask", attention_mask, batch, seen + count)
        hidden = self.backbone.encode(inputs_embeds, position_ids, cache, attention_mask, block_ids)
        return EncoderOutput(last_hidden_state=hidden, past_key_values=cache)


def image_block_ids(mm_token_type_ids: torch.Tensor) -> torch.Tensor:
    """Per token, the index of the image it belongs to (consecutive image tokens form one image), -1 for text."""
    is_image = (mm_token_type_ids == 1) | (mm_token_type_ids == 2)
    starts = is_image.clone()
    starts[:, 1:] &= ~is_image[:, :-1]
    return torch.where(is_image, starts.cumsum(dim=1) - 1, -1)


class DiffusionGemmaEncoderModel(DiffusionGemmaPreTrainedModel):
    """The encoder: text backbone plus, in checkpoints that have one, the vision tower whose soft tokens
    replace the prompt's image placeholder tokens."""

    def __init__(self, config: DiffusionGemmaConfig, backbone: TextBackbone | None = None):
        super().__init__(config)
        self.language_model = DiffusionGemmaEncoderTextModel(config.text_config, backbone)
        self.vision_tower = self.embed_vision = None
        if config.vision_config is not None:
            vision_config = VisionConfig.from_dict(config.vision_config)
            self.vision_tower = VisionTower(vision_config)
            self.embed_vision = VisionEmbedder(vision_config, config.text_config.hidden_size)

    def _insert_images(self, input_ids, embeds, pixel_values, image_position_ids):
        if self.vision_tower is None:
            raise ValueError("this checkpoint has no vision tower, so it cannot take `pixel_values`")
        if input_ids is None or image_position_ids is None:
            raise ValueError("`pixel_values` need `input_ids` with image tokens and `image_position_ids`")
        features = embed_images(self.vision_tower, self.embed_vision, pixel_values, image_position_ids)
        slots = input_ids == self.config.image_token_id
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(f"the prompt has {int(slots.sum())} image tokens but the images give "
                             f"{features.shape[0]} soft tokens; they must match")
        return embeds.masked_scatter(slots[..., None], features.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_position_ids: torch.Tensor | None = None,
    ) -> EncoderOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
        if inputs_embeds is None:
            inputs_embeds = self.language_model.backbone.embed(input_ids)
        if pixel_values is not None:
            inputs_embeds = self._insert_images(input_ids, inputs_embeds, pixel_values, image_position_ids)
        block_ids = None
        if mm_token_type_ids is not None and self.config.text_config.use_bidirectional_attention == "vision":
            block_ids = image_block_ids(mm_token_type_ids.to(inputs_embeds.device))
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, past_key_values=past_key_values, block_ids=block_ids)


class DiffusionGemmaDecoderModel(DiffusionGemmaPreTrainedModel):
    """The backbone in its decoder role: bidirectional over a canvas, reading the cache only."""

    def __init__(self, config: DiffusionGemmaConfig, backbone: TextBackbone | None = None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else TextBackbone(config.text_config)
        self.self_conditioning = SelfConditioning(config.text_config)

    def soft_embeddings(self, logits: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The expected embedding under softmax(logits), scaled like a token embedding."""
        weight = self.backbone.embed_tokens.weight
        if fused.takes(logits):
            # One kernel on CUDA (see `fused.py`), where autograd records nothing.
            probs = fused.softmax(logits, weight.dtype)
        else:
            probs = logits.softmax(dim=-1, dtype=torch.float32).to(weight.dtype)
        soft = self.backbone.embed_tokens.expected(probs)
        soft = soft * self.backbone.embed_scale.to(dtype)
        if mask is not None:
            soft = soft * mask.to(soft.dtype)[:, None, None]
        return soft

    def forward(
        self,
        decoder_input_ids: torch.Tensor,
        past_key_values: KVCache | list[KVCache] | None = None,
        self_conditioning_logits: torch.Tensor | None = None,
        self_conditioning_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """`past_key_values` may also be a list with one cache per row, each of its own length: the rows
        are then independent requests denoised side by side (see `TextBackbone.decode`), and
        `self_conditioning_logits` may be a list too, one [1, canvas, vocab] tensor per row or None for a
        row on the first step of its canvas."""
        if past_key_values is None:
            raise ValueError("the decoder attends to the encoded prefix: `past_key_values` is required")
        batch, length = decoder_input_ids.shape
        check_cache(past_key_values, batch)
        embeds = self.backbone.embed(decoder_input_ids)
        soft = None
        if isinstance(self_conditioning_logits, list):
            # Row by row: on the CPU one request's vocabulary-sized tensor stays in cache, a batch's does
            # not. A row without a signal gets zeros, which the self-conditioning MLP maps to exactly zero.
            rows = [None if logits is None else self.soft_embeddings(logits, None, embeds.dtype)
                    for logits in self_conditioning_logits]
            if any(row is not None for row in rows):
                soft = torch.cat([torch.zeros_like(embeds[:1]) if row is None else row for row in rows])
        elif self_conditioning_logits is not None:
            soft = self.soft_embeddings(self_conditioning_logits, self_conditioning_mask, embeds.dtype)
        hidden = self.self_conditioning(embeds, soft)
        if isinstance(past_key_values, list) and not isinstance(past_key_values, RequestCaches):
            past_key_values = RequestCaches(past_key_values)
        caches = past_key_values if isinstance(past_key_values, list) else [past_key_values]
        if decoder_position_ids is None:
            decoder_position_ids = torch.stack([torch.arange(c.get_seq_length(), c.get_seq_length() + length,
                                                             device=embeds.device) for c in caches])
        if decoder_attention_mask is not None and isinstance(past_key_values, list):
            raise ValueError("`decoder_attention_mask` needs one cache for the whole batch, not a list")
        mask = check_mask("decoder_attention_mask", decoder_attention_mask, batch,
                           caches[0].get_seq_length() + length)
        return DecoderOutput(last_hidden_state=self.backbone.decode(hidden, decoder_position_ids, past_key_values, mask))


class DiffusionGemmaModel(DiffusionGemmaPreTrainedModel):
    """Encoder and decoder over one shared backbone; the encoder hands the decoder its cache only."""

    def __init__(self, config: DiffusionGemmaConfig):
        super().__init__(config)
        backbone = TextBackbone(config.text_config)
        self.encoder = DiffusionGemmaEncoderModel(config, backbone)
        self.decoder = DiffusionGemmaDecoderModel(config, backbone)

    @property
    def backbone(self) -> TextBackbone:
        return self.decoder.backbone

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        self_conditioning_logits: torch.Tensor | None = None,
        self_conditioning_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        image_position_ids: torch.Tensor | None = None,
    ) -> tuple[DecoderOutput, KVCache, torch.Tensor | None]:
        encoder_hidden = None
        if input_ids is not None:
            encoded = self.encoder(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                   position_ids=position_ids, past_key_values=past_key_values,
                                   mm_token_type_ids=mm_token_type_ids, image_position_ids=image_position_ids)
            past_key_values, encoder_hidden = encoded.past_key_values, encoded.last_hidden_state
        elif past_key_values is None:
            raise ValueError("pass `input_ids` to encode, `past_key_values` of an earlier pass, or both")
        if decoder_input_ids is None:
            batch = input_ids.shape[0] if input_ids is not None else past_key_values.batch_size
            decoder_input_ids = torch.randint(0, self.config.text_config.vocab_size,
                                              (batch, self.config.canvas_length), device=self.device)
        decoded = self.decoder(decoder_input_ids=decoder_input_ids, past_key_values=past_key_values,
                               self_conditioning_logits=self_conditioning_logits,
                               self_conditioning_mask=self_conditioning_mask,
                               decoder_attention_mask=decoder_attention_mask,
                               decoder_position_ids=decoder_position_ids)
        return decoded, past_key_values, encoder_hidden


class BlockDiffusionLM(DiffusionGemmaPreTrainedModel):
    """DiffusionGemma with its LM head (the embedding matrix). `generate` is the engine's: the public class
    `DiffusionGemmaForBlockDiffusion` (`hf/modeling.py`) adds it."""

    def __init__(self, config: DiffusionGemmaConfig):
        super().__init__(config)
        self.model = DiffusionGemmaModel(config)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The scores before soft-capping, in the model's dtype."""
        return self.model.backbone.embed_tokens.scores(hidden)

    def decoder_scores(self, cache, attention_mask, positions, current, self_conditioning_logits,
                       self_conditioning_mask=None, soft_capped: bool = True) -> torch.Tensor:
        """The decoder pass's soft-capped logits, or with `soft_capped=False` the LM head's scores (what the
        fused sampler soft-caps itself)."""
        hidden = self.model.decoder(decoder_input_ids=current, past_key_values=cache,
                                    self_conditioning_logits=self_conditioning_logits,
                                    self_conditioning_mask=self_conditioning_mask,
                                    decoder_attention_mask=attention_mask,
                                    decoder_position_ids=positions).last_hidden_state
        return self.logits(hidden) if soft_capped else self.lm_head(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits, soft-capped."""
        return soft_cap(self.lm_head(hidden).float(), self.config.text_config.final_logit_softcapping)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        self_conditioning_logits: torch.Tensor | None = None,
        self_conditioning_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        image_position_ids: torch.Tensor | None = None,
    ) -> BlockDiffusionOutput:
        decoded, cache, encoder_hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
            position_ids=position_ids, decoder_input_ids=decoder_input_ids,
            self_conditioning_logits=self_conditioning_logits, self_conditioning_mask=self_conditioning_mask,
            decoder_attention_mask=decoder_attention_mask, decoder_position_ids=decoder_position_ids,
            pixel_values=pixel_values, mm_token_type_ids=mm_token_type_ids, image_position_ids=image_position_ids)
        return BlockDiffusionOutput(logits=self.logits(decoded.last_hidden_state), past_key_values=cache,
                                    last_hidden_state=decoded.last_hidden_state,
                                    encoder_last_hidden_state=encoder_hidden)
