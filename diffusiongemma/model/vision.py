"""The Gemma 4 vision tower and the projection of its soft tokens into the text model.

Images arrive as padded patch sequences (see ``image_processing.py``): ``pixel_values`` of shape
``[images, max_patches, 3 * patch * patch]`` and ``image_position_ids`` of shape ``[images, max_patches, 2]``
holding each patch's (column, row), with (-1, -1) marking padding. The tower runs a bidirectional
transformer over the patches, averages each ``k x k`` block of patches into one soft token and returns the
soft tokens of all images concatenated, in image order and row-major within an image: the order in which
the prompt's image placeholder tokens are filled.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm, rms_norm

__all__ = ["VisionConfig", "VisionTower", "VisionEmbedder", "embed_images"]

_ACTIVATIONS = {
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}

_MODEL_TYPE = "gemma4_vision"
_DEFAULT_ROPE_THETA = 100.0


@dataclass(frozen=True)
class VisionConfig:
    """The `vision_config` of a checkpoint (model_type "gemma4_vision"), with the reference's defaults."""

    # Images into patches, patches into soft tokens.
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    pooling_kernel_size: int = 3
    standardize: bool = False
    # Attention over the patches: 12 heads of 64 fill the 768-wide residual; keys and values are not shared.
    hidden_size: int = 768
    head_dim: int = 64
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    rope_theta: float = _DEFAULT_ROPE_THETA
    # The MLP is four residuals wide.
    intermediate_size: int = 4 * 768
    hidden_activation: str = "gelu_pytorch_tanh"
    use_clipped_linears: bool = False
    # Sixteen such layers, RMS-normed.
    num_hidden_layers: int = 16
    rms_norm_eps: float = 1e-6
    # Kept for the config's sake only: the reference builds its projections without bias whatever this says.
    attention_bias: bool = False
    attention_dropout: float = 0.0
    max_position_embeddings: int = 131_072
    initializer_range: float = 0.02
    # Keys this engine does not interpret (e.g. `default_output_length`, `dtype`), kept so that
    # `to_dict` gives back what `from_dict` was given.
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "pooling_kernel_size",
                     "patch_size", "position_embedding_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"vision_config.{name} must be a positive integer, got {value!r}")
        for name in ("attention_bias", "use_clipped_linears", "standardize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"vision_config.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ValueError(f"vision_config.{name} must be a positive number, got {value!r}")
        if not _is_number(self.attention_dropout) or not 0 <= self.attention_dropout < 1:
            raise ValueError(f"vision_config.attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        if not _is_number(self.initializer_range) or self.initializer_range < 0:
            raise ValueError(f"vision_config.initializer_range must be >= 0, got {self.initializer_range!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"vision_config.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        # The head is split in two halves (columns, rows), each rotated half against half.
        if self.head_dim % 4:
            raise ValueError(f"vision_config.head_dim must be a multiple of 4 for 2-D RoPE, got {self.head_dim}")
        if self.hidden_activation not in _ACTIVATIONS:
            raise ValueError(
                f"vision_config.hidden_activation must be one of {sorted(_ACTIVATIONS)}, "
                f"got {self.hidden_activation!r}"
            )

    @classmethod
    def from_dict(cls, config: Mapping) -> VisionConfig:
        """Builds the config from a checkpoint's ``vision_config`` dict (unknown keys are kept, not used)."""
        if not isinstance(config, Mapping):
            raise ValueError(f"vision_config must be a dict, got {type(config).__name__}")
        config = dict(config)
        model_type = config.pop("model_type", _MODEL_TYPE)
        if model_type != _MODEL_TYPE:
            raise ValueError(f"vision_config.model_type must be {_MODEL_TYPE!r}, got {model_type!r}")
        kwargs = {"rope_theta": _rope_theta(config)}
        known = {f.name for f in fields(cls)} - {"extra", "rope_theta"}
        for name in known & config.keys():
            value = config.pop(name)
            # Configs written by other tools store null for "the default".
            if value is not None:
                kwargs[name] = value
        return cls(**kwargs, extra=config)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("extra")
        out["rope_parameters"] = {"rope_type": "axial", "rope_theta": out.pop("rope_theta")}
        return {"model_type": _MODEL_TYPE, **out, **self.extra}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _rope_theta(config: dict) -> float:
    """Pops every RoPE key from ``config`` and returns the one setting the tower has, its theta."""
    legacy_theta = config.pop("rope_theta", None)
    scaling, params = config.pop("rope_scaling", None), config.pop("rope_parameters", None)
    # As in the reference, the legacy `rope_scaling` entry wins over `rope_parameters`.
    params = scaling or params or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"vision_config.rope_parameters must be a dict, got {params!r}")
    params = dict(params)
    legacy_type = params.pop("type", "default")
    rope_type = params.pop("rope_type", legacy_type)
    # Older exports call the tower's RoPE "default"; the reference reads that as axial.
    if rope_type not in ("axial", "default"):
        raise ValueError(f"vision_config.rope_parameters.rope_type must be 'axial', got {rope_type!r}")
    theta = params.pop("rope_theta", None)
    if params:
        raise ValueError(f"vision_config.rope_parameters has settings axial RoPE does not take: {sorted(params)}")
    for value in (theta, legacy_theta):
        if value is not None:
            return value
    return _DEFAULT_ROPE_THETA


class ClippableLinear(nn.Module):
    """A bias-free linear layer whose input and output may be clamped to learned bounds."""

    def __init__(self, in_features: int, out_features: int, clipped: bool):
        super().__init__()
        self.clipped = clipped
        self.linear = nn.Linear(in_features, out_features, bias=False)
        if clipped:
            for name, bound in (("input_min", -1), ("input_max", 1), ("output_min", -1), ("output_max", 1)):
                self.register_buffer(name, torch.tensor(bound * float("inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.clipped:
            return self.linear(x)
        x = torch.clamp(x, self.input_min, self.input_max)
        return torch.clamp(self.linear(x), self.output_min, self.output_max)


class PatchEmbedder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * config.patch_size**2, config.hidden_size, bias=False)
        # [axis (column, row), position, hidden]: a patch's embedding is its column's plus its row's.
        self.position_embedding_table = nn.Parameter(
            torch.ones(2, config.position_embedding_size, config.hidden_size)
        )

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        # Pixels come in [0, 1]; the tower was trained on [-1, 1].
        x = self.input_proj((2 * (pixel_values - 0.5)).to(self.input_proj.weight.dtype))
        positions = positions.clamp(min=0)
        table = self.position_embedding_table
        position_embeddings = table[0][positions[..., 0]] + table[1][positions[..., 1]]
        return x + position_embeddings.masked_fill(padding.unsqueeze(-1), 0.0)


def axial_rope(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin of shape [batch, patches, head_dim]: the first half of a head turns with the patch's
    column, the second half with its row, each half laid out for rotate-half pairing."""
    axis_dim = head_dim // 2
    exponents = torch.arange(0, axis_dim, 2, dtype=torch.float, device=positions.device) / axis_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.float().unsqueeze(-1) * inv_freq  # [batch, patches, 2, head_dim // 4]
    cols, rows = angles[..., 0, :], angles[..., 1, :]
    angles = torch.cat([cols, cols, rows, rows], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, patches, heads, head_dim]; each half of the head is rotated on its own."""
    halves = x.unflatten(-1, (2, 2, -1))  # [..., axis, half, head_dim // 4]
    rotated = torch.stack((-halves[..., 1, :], halves[..., 0, :]), dim=-2).flatten(-3)
    return x * cos.unsqueeze(2) + rotated * sin.unsqueeze(2)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.kv_groups = config.num_attention_heads // config.num_key_value_heads
        self.eps = config.rms_norm_eps
        q_size = config.num_attention_heads * config.head_dim
        kv_size = config.num_key_value_heads * config.head_dim
        clipped = config.use_clipped_linears
        self.q_proj = ClippableLinear(config.hidden_size, q_size, clipped)
        self.k_proj = ClippableLinear(config.hidden_size, kv_size, clipped)
        self.v_proj = ClippableLinear(config.hidden_size, kv_size, clipped)
        self.o_proj = ClippableLinear(q_size, config.hidden_size, clipped)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        heads_shape = (*x.shape[:-1], -1, self.head_dim)
        q = apply_axial_rope(self.q_norm(self.q_proj(x).view(heads_shape)), cos, sin).transpose(1, 2)
        k = apply_axial_rope(self.k_norm(self.k_proj(x).view(heads_shape)), cos, sin).transpose(1, 2)
        v = rms_norm(self.v_proj(x).view(heads_shape), None, self.eps).transpose(1, 2)
        if self.kv_groups > 1:
            k = k.repeat_interleave(self.kv_groups, dim=1)
            v = v.repeat_interleave(self.kv_groups, dim=1)
        # The q/k norms take the place of the 1/sqrt(head_dim) scaling.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        clipped = config.use_clipped_linears
        self.gate_proj = ClippableLinear(config.hidden_size, config.intermediate_size, clipped)
        self.up_proj = ClippableLinear(config.hidden_size, config.intermediate_size, clipped)
        self.down_proj = ClippableLinear(config.intermediate_size, config.hidden_size, clipped)
        self.act = _ACTIVATIONS[config.hidden_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return x


class VisionTower(nn.Module):
    """Patches in, soft tokens out. Its ``state_dict`` keys are the checkpoint's keys under
    ``model.encoder.vision_tower.``."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = VisionEncoder(config)
        if config.standardize:
            self.register_buffer("std_bias", torch.zeros(config.hidden_size))
            self.register_buffer("std_scale", torch.ones(config.hidden_size))

    def forward(self, pixel_values: torch.Tensor, image_position_ids: torch.Tensor) -> torch.Tensor:
        """pixel_values [images, max_patches, 3 * patch * patch] in [0, 1], image_position_ids
        [images, max_patches, 2] -> soft tokens [total_soft_tokens, hidden_size], padding dropped."""
        self._check_shapes(pixel_values, image_position_ids)
        image_position_ids = image_position_ids.long()
        slots, num_slots = self._pooling_slots(image_position_ids)
        self._check_positions(image_position_ids, slots, num_slots)
        padding = (image_position_ids == -1).all(dim=-1)
        x = self.patch_embedder(pixel_values, image_position_ids, padding)
        cos, sin = axial_rope(image_position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        x = self.encoder(x, cos, sin, ~padding[:, None, None, :])
        pooled, filled = self._pool(x.masked_fill(padding.unsqueeze(-1), 0.0), slots, num_slots)
        # The sqrt(hidden) scale can overflow float16, so it and the standardisation stay in float32.
        features = pooled[filled].float() * self.config.hidden_size**0.5
        if self.config.standardize:
            features = (features - self.std_bias.float()) * self.std_scale.float()
        return features.to(x.dtype)

    def _pooling_slots(self, positions: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The soft token each patch is averaged into: k x k blocks of patches, numbered row-major
        over the image's grid of blocks. Padding patches land in slot 0, where they add zeros."""
        k = self.config.pooling_kernel_size
        positions = positions.clamp(min=0)
        blocks_per_row = (positions[..., 0].amax(dim=-1, keepdim=True) + 1) // k
        block = torch.div(positions, k, rounding_mode="floor")
        return block[..., 0] + blocks_per_row * block[..., 1], positions.shape[1] // k**2

    def _pool(self, x: torch.Tensor, slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block averages (summed in float32, returned in x's dtype) and which slots got any patch."""
        membership = F.one_hot(slots, num_slots)  # [batch, patches, slots]
        weights = membership.transpose(1, 2).float() / self.config.pooling_kernel_size**2
        return torch.matmul(weights, x.float()).to(x.dtype), membership.any(dim=1)

    def _check_shapes(self, pixel_values: torch.Tensor, positions: torch.Tensor) -> None:
        patch_dim = 3 * self.config.patch_size**2
        if (pixel_values.dim() != 3 or pixel_values.shape[-1] != patch_dim or pixel_values.numel() == 0
                or not pixel_values.is_floating_point()):
            raise ValueError(
                f"pixel_values must be a non-empty float tensor [images, max_patches, {patch_dim}], "
                f"got {pixel_values.dtype} {tuple(pixel_values.shape)}"
            )
        if positions.shape != (*pixel_values.shape[:2], 2) or positions.is_floating_point():
            raise ValueError(
                f"image_position_ids must be an integer tensor {(*pixel_values.shape[:2], 2)}, "
                f"got {positions.dtype} {tuple(positions.shape)}"
            )
        k_squared = self.config.pooling_kernel_size**2
        if pixel_values.shape[1] % k_squared:
            raise ValueError(
                f"max_patches ({pixel_values.shape[1]}) must be a multiple of pooling_kernel_size**2 ({k_squared})"
            )

    def _check_positions(self, positions: torch.Tensor, slots: torch.Tensor, num_slots: int) -> None:
        # One host sync for all checks; an out-of-range index would otherwise fail deep inside a kernel.
        low, high, top_slot = torch.stack([positions.amin(), positions.amax(), slots.amax()]).tolist()
        if low < -1 or high >= self.config.position_embedding_size or top_slot >= num_slots:
            raise ValueError(
                f"image_position_ids must hold (column, row) pairs in [0, {self.config.position_embedding_size}) "
                f"or (-1, -1) for padding, with at most {num_slots} soft tokens per image; "
                f"got values in [{low}, {high}] needing {top_slot + 1} soft tokens"
            )


class VisionEmbedder(nn.Module):
    """Soft tokens -> text embedding space: a scale-free RMS norm, then a linear map. Its ``state_dict``
    keys are the checkpoint's keys under ``model.encoder.embed_vision.``."""

    def __init__(self, config: VisionConfig, text_hidden_size: int):
        super().__init__()
        if not isinstance(text_hidden_size, int) or isinstance(text_hidden_size, bool) or text_hidden_size <= 0:
            raise ValueError(f"text_hidden_size must be a positive integer, got {text_hidden_size!r}")
        self.eps = config.rms_norm_eps
        self.embedding_projection = nn.Linear(config.hidden_size, text_hidden_size, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(rms_norm(features, None, self.eps))


def embed_images(
    vision_tower: VisionTower,
    embed_vision: VisionEmbedder,
    pixel_values: torch.Tensor,
    image_position_ids: torch.Tensor,
) -> torch.Tensor:
    """[total_soft_tokens, text_hidden]: row i fills the prompt's i-th image placeholder token."""
    return embed_vision(vision_tower(pixel_values, image_position_ids))
