"""Typed model configuration, read from and written to the Hugging Face `config.json` layout.

Everything is validated here, once; the model code trusts these objects.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
ROPE_TYPES = ("default", "proportional")
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")
BIDIRECTIONAL_MODES = (None, "vision", "all")


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; a malformed file is a ValueError that names it."""
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _positive_int(name: str, value: Any) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
           f"`{name}` must be a positive integer, got {value!r}")


def _default_rope_parameters() -> dict[str, dict[str, Any]]:
    return {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }


@dataclass(frozen=True)
class AttentionShape:
    """What one layer's attention looks like; full layers differ from sliding ones."""

    layer_type: str
    head_dim: int
    num_key_value_heads: int

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING


@dataclass
class DiffusionGemmaTextConfig:
    """The transformer shared by the encoder and the decoder.

    `sliding_window` holds the window the attention masks use. With `use_bidirectional_attention="all"`
    the checkpoint's value `w` becomes `w // 2 + 1` (and is written back as the original `w`), as the
    reference does.
    """

    # Sizes.
    num_hidden_layers: int = 30
    hidden_size: int = 2304
    intermediate_size: int = 9216  # of the dense MLP beside the experts
    vocab_size: int = 2**18
    # Attention. Full-attention layers get `global_head_dim` and `num_global_key_value_heads` unless
    # `per_layer_config` ({layer_index: {"head_dim": .., "num_key_value_heads": ..}}) says otherwise.
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    per_layer_config: dict[int, dict[str, int]] | None = None
    layer_types: list[str] | None = None
    sliding_window: int = 512
    use_bidirectional_attention: str | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    rope_parameters: dict[str, dict[str, Any]] | None = None
    max_position_embeddings: int = 131_072
    # Mixture of experts: required, DiffusionGemma always has it.
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    # Numerics.
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    # Special tokens.
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 0
    # Keys of the file this engine does not use; kept so that saving writes them back.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.use_bidirectional_attention == "all":
            self.sliding_window = self.sliding_window // 2 + 1
        if self.layer_types is None:
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
            self.layer_types[-1] = FULL
        self.layer_types = list(self.layer_types)
        if self.rope_parameters is None:
            self.rope_parameters = _default_rope_parameters()
        if self.per_layer_config is None:
            overrides: dict[str, int] = {"head_dim": self.global_head_dim}
            if self.num_global_key_value_heads is not None:
                overrides["num_key_value_heads"] = self.num_global_key_value_heads
            self.per_layer_config = {i: dict(overrides) for i, t in enumerate(self.layer_types) if t == FULL}
        else:
            self.per_layer_config = {int(i): dict(v) for i, v in self.per_layer_config.items()}
        self._validate()

    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window",
                     "num_experts", "top_k_experts", "moe_intermediate_size"):
            _positive_int(name, getattr(self, name))
        _check(self.top_k_experts <= self.num_experts,
               f"`top_k_experts` ({self.top_k_experts}) cannot exceed `num_experts` ({self.num_experts})")
        _check(self.hidden_activation in ACTIVATIONS,
               f"`hidden_activation` must be one of {ACTIVATIONS}, got {self.hidden_activation!r}")
        _check(self.use_bidirectional_attention in BIDIRECTIONAL_MODES,
               f"`use_bidirectional_attention` must be one of {BIDIRECTIONAL_MODES}, "
               f"got {self.use_bidirectional_attention!r}")
        _check(isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0,
               f"`rms_norm_eps` must be > 0, got {self.rms_norm_eps!r}")
        _check(self.final_logit_softcapping is None or self.final_logit_softcapping > 0,
               f"`final_logit_softcapping` must be > 0 or null, got {self.final_logit_softcapping!r}")
        _check(self.tie_word_embeddings is True,
               "`tie_word_embeddings` must be true: DiffusionGemma's LM head is its embedding matrix")

        _check(len(self.layer_types) == self.num_hidden_layers,
               f"`layer_types` has {len(self.layer_types)} entries but `num_hidden_layers` is {self.num_hidden_layers}")
        unknown = sorted({t for t in self.layer_types if t not in (SLIDING, FULL)})
        _check(not unknown, f"unknown `layer_types` {unknown}; expected {SLIDING!r} or {FULL!r}")
        _check(self.layer_types[-1] == FULL, "the last entry of `layer_types` must be 'full_attention'")

        for index, overrides in self.per_layer_config.items():
            _check(0 <= index < self.num_hidden_layers,
                   f"`per_layer_config` names layer {index}, but there are {self.num_hidden_layers} layers")
            unsupported = sorted(set(overrides) - {"head_dim", "num_key_value_heads"})
            _check(not unsupported, f"`per_layer_config` for layer {index} overrides unsupported keys {unsupported}")
        for shape in self.attention_shapes:
            _positive_int("head_dim", shape.head_dim)
            _positive_int("num_key_value_heads", shape.num_key_value_heads)
            _check(self.num_attention_heads % shape.num_key_value_heads == 0,
                   f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of the "
                   f"{shape.num_key_value_heads} key/value heads of a {shape.layer_type} layer")
            _check(shape.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {shape.head_dim}")
        for layer_type in set(self.layer_types):
            dims = {s.head_dim for s in self.attention_shapes if s.layer_type == layer_type}
            _check(len(dims) == 1, f"all {layer_type} layers must share one head_dim, got {sorted(dims)}")
            self._validate_rope(layer_type)

    def _validate_rope(self, layer_type: str) -> None:
        params = self.rope_parameters.get(layer_type)
        _check(isinstance(params, dict), f"`rope_parameters` has no entry for {layer_type!r}")
        rope_type = params.get("rope_type", "default")
        _check(rope_type in ROPE_TYPES, f"unsupported rope_type {rope_type!r} for {layer_type}; "
                                        f"supported: {ROPE_TYPES}")
        theta = params.get("rope_theta")
        _check(isinstance(theta, (int, float)) and theta > 0, f"`rope_theta` for {layer_type} must be > 0, got {theta!r}")
        factor = params.get("partial_rotary_factor", 1.0)
        _check(0 < factor <= 1, f"`partial_rotary_factor` for {layer_type} must be in (0, 1], got {factor!r}")
        _check(rope_type == "proportional" or factor == 1.0,
               f"`partial_rotary_factor` is only supported with proportional RoPE ({layer_type})")
        _check(params.get("factor", 1.0) > 0, f"rope `factor` for {layer_type} must be > 0")

    @property
    def attention_shapes(self) -> list[AttentionShape]:
        shapes = []
        for index, layer_type in enumerate(self.layer_types):
            overrides = self.per_layer_config.get(index, {})
            shapes.append(AttentionShape(
                layer_type=layer_type,
                head_dim=overrides.get("head_dim", self.head_dim),
                num_key_value_heads=overrides.get("num_key_value_heads", self.num_key_value_heads),
            ))
        return shapes

    @property
    def is_causal(self) -> bool:
        return self.use_bidirectional_attention != "all"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiffusionGemmaTextConfig:
        data = copy.deepcopy(data)
        model_type = data.pop("model_type", "diffusion_gemma_text")
        _check(model_type == "diffusion_gemma_text",
               f"unsupported text model_type {model_type!r}; expected 'diffusion_gemma_text'")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: data.pop(k) for k in list(data) if k in known}
        kwargs.setdefault("extra", {}).update(data)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        out.pop("extra")
        # The per-layer table carries the full-layer shapes; the two shortcuts would be redundant.
        out.pop("global_head_dim")
        out.pop("num_global_key_value_heads")
        out["per_layer_config"] = {str(i): v for i, v in sorted(self.per_layer_config.items())}
        if self.use_bidirectional_attention == "all":
            out["sliding_window"] = (self.sliding_window - 1) * 2
        out["model_type"] = "diffusion_gemma_text"
        out.update(copy.deepcopy(self.extra))
        return out


@dataclass
class DiffusionGemmaConfig:
    """The whole model: text transformer, optional vision tower, canvas and image token ids."""

    text_config: DiffusionGemmaTextConfig = field(default_factory=DiffusionGemmaTextConfig)
    # Parsed by the vision module; kept as the file had it.
    vision_config: dict[str, Any] | None = None
    boi_token_id: int | None = 255_999
    eoi_token_id: int | None = 258_882
    image_token_id: int | None = 258_880
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    canvas_length: int = 256
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.text_config, dict):
            self.text_config = DiffusionGemmaTextConfig.from_dict(self.text_config)
        _positive_int("canvas_length", self.canvas_length)
        _check(self.tie_word_embeddings is True,
               "`tie_word_embeddings` must be true: the encoder, the decoder and the LM head share their weights")
        if self.vision_config is not None:
            _check(isinstance(self.vision_config, dict), "`vision_config` must be a JSON object or null")
            vision_type = self.vision_config.get("model_type", "gemma4_vision")
            _check(vision_type == "gemma4_vision",
                   f"unsupported vision model_type {vision_type!r}; expected 'gemma4_vision'")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiffusionGemmaConfig:
        data = copy.deepcopy(data)
        model_type = data.pop("model_type", None)
        _check(model_type == "diffusion_gemma",
               f"unsupported model_type {model_type!r}; this engine runs 'diffusion_gemma' checkpoints")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: data.pop(k) for k in list(data) if k in known}
        kwargs["text_config"] = DiffusionGemmaTextConfig.from_dict(kwargs.get("text_config") or {})
        kwargs["extra"] = data
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> DiffusionGemmaConfig:
        return cls.from_dict(read_json(path))

    def to_dict(self) -> dict[str, Any]:
        out = {
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "model_type": "diffusion_gemma",
            "text_config": self.text_config.to_dict(),
            "vision_config": copy.deepcopy(self.vision_config),
            "boi_token_id": self.boi_token_id,
            "eoi_token_id": self.eoi_token_id,
            "image_token_id": self.image_token_id,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            "canvas_length": self.canvas_length,
        }
        out.update(copy.deepcopy(self.extra))
        return out
