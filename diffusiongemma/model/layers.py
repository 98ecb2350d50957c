"""Building blocks of the DiffusionGemma transformer layer: norms, rotary embeddings, attention, the
dense MLP and the mixture of experts. Numerics follow the reference operation by operation (float32
norms, float32 router, float32 weighted expert sum) so that results agree to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import fused
from ..kernels.experts import grouped_linear
from .config import AttentionShape, DiffusionGemmaTextConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # On CUDA one kernel where autograd records nothing (see `fused.py`); its last bits are its own.
    if fused.takes(x, weight):
        return fused.rms_norm(x, weight, eps)
    # float32 throughout, and pow(-0.5) rather than rsqrt: the reference's exact formula. It casts x twice
    # and the weight once; casting x once, and letting the product promote a 16-bit weight to float32
    # (exactly, as the cast does), gives the same values in two kernels fewer. (The experts' grouped
    # products take no float64, so no weight is wider than float32.)
    x32 = x.float()
    normed = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        normed = normed * weight
    return normed.type_as(x)


class TokenEmbedding(nn.Embedding):
    """The token embedding, tied to the LM head and to the self-conditioning product. Its three products are
    methods so that a tensor-parallel model (`distributed/tensor_parallel.py`) can run each over its share
    of the vocabulary."""

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: every token's score, in the weight's dtype."""
        return F.linear(hidden, self.weight)

    def expected(self, probs: torch.Tensor) -> torch.Tensor:
        """The embedding expected under `probs` [..., vocab] (unscaled)."""
        return torch.matmul(probs, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def activation(config: DiffusionGemmaTextConfig):
    approximate = "tanh" if config.hidden_activation == "gelu_pytorch_tanh" else "none"
    return lambda x: F.gelu(x, approximate=approximate)


def rope_inverse_frequencies(config: DiffusionGemmaTextConfig, layer_type: str, head_dim: int) -> torch.Tensor:
    params = config.rope_parameters[layer_type]
    theta = params["rope_theta"]
    if params.get("rope_type", "default") == "default":
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    # Proportional RoPE: the first `factor * head_dim / 2` frequency pairs rotate, with exponents over
    # the whole head_dim; the remaining pairs get frequency zero, i.e. they pass through unrotated.
    rotated = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
    exponents = torch.arange(0, 2 * rotated, 2, dtype=torch.float) / head_dim
    frequencies = torch.cat([1.0 / (theta ** exponents), torch.zeros(head_dim // 2 - rotated)])
    return frequencies / params.get("factor", 1.0)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: DiffusionGemmaTextConfig):
        super().__init__()
        self.config = config
        self.reset()

    def reset(self, device: torch.device | None = None) -> None:
        """(Re)computes the frequencies in float32, whatever dtype the model was built in."""
        for shape in self.config.attention_shapes:
            frequencies = rope_inverse_frequencies(self.config, shape.layer_type, shape.head_dim)
            self.register_buffer(f"{shape.layer_type}_inv_freq", frequencies.to(device), persistent=False)

    def forward(self, positions: torch.Tensor, layer_type: str, dtype: torch.dtype):
        """cos and sin of shape [B or 1, T, 1, head_dim] for integer positions [B or 1, T]; the first half of
        sin comes negated, the sign of the rotate-half convention (see `apply_rope`)."""
        inv_freq = getattr(self, f"{layer_type}_inv_freq")
        angles = positions[..., None, None].float() * inv_freq.float()
        angles = torch.cat([angles, angles], dim=-1)
        sin = angles.sin()
        sin[..., :inv_freq.shape[0]].neg_()
        return angles.cos().to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, heads, D]. Rotate-half pairs element i with i + D/2: x * cos + [-x2, x1] * sin. Rolling x
    by half and folding the minus into sin gives the same products bit for bit in two operations fewer."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: DiffusionGemmaTextConfig, shape: AttentionShape):
        super().__init__()
        hidden, heads, bias = config.hidden_size, config.num_attention_heads, config.attention_bias
        self.head_dim = shape.head_dim
        self.eps = config.rms_norm_eps
        self.q_proj = nn.Linear(hidden, heads * shape.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, shape.num_key_value_heads * shape.head_dim, bias=bias)
        # Full-attention layers have no value projection: values are the raw key projection.
        self.v_proj = nn.Linear(hidden, shape.num_key_value_heads * shape.head_dim, bias=bias) if shape.is_sliding else None
        self.o_proj = nn.Linear(heads * shape.head_dim, hidden, bias=bias)
        self.q_norm = RMSNorm(shape.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(shape.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        batch, length, _ = x.shape
        split = (batch, length, -1, self.head_dim)
        q = apply_rope(self.q_norm(self.q_proj(x).view(split)), cos, sin).transpose(1, 2)
        k_raw = self.k_proj(x).view(split)
        v = self.v_proj(x).view(split) if self.v_proj is not None else k_raw
        k = apply_rope(self.k_norm(k_raw), cos, sin).transpose(1, 2)
        v = rms_norm(v, None, self.eps).transpose(1, 2)
        out = attend(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class DenseMLP(nn.Module):
    def __init__(self, config: DiffusionGemmaTextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = activation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, config: DiffusionGemmaTextConfig):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.top_k = config.top_k_experts
        self.root_size = config.hidden_size ** -0.5
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert weights and indices, both [tokens, top_k]; weights are float32."""
        scores = self.proj(rms_norm(x, None, self.eps) * self.scale * self.root_size)
        probabilities = F.softmax(scores, dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(probabilities, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[indices], indices


class Experts(nn.Module):
    """All experts' weights as 3-D tensors; tokens are sorted by expert and run as grouped products
    (`kernels.experts.grouped_linear`)."""

    def __init__(self, config: DiffusionGemmaTextConfig):
        super().__init__()
        experts, hidden, inner = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inner))
        if not self.gate_up_proj.is_meta:  # a model built to be loaded needs no initial values
            nn.init.normal_(self.gate_up_proj, std=config.initializer_range)
            nn.init.normal_(self.down_proj, std=config.initializer_range)
        self.act = activation(config)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        tokens, top_k = indices.shape
        experts = self.gate_up_proj.shape[0]
        sorted_experts, order = torch.sort(indices.reshape(-1))
        rows = x.index_select(0, order // top_k)  # a third of what advanced indexing costs here
        # Where each expert's rows end, counted without bincount, which asks the device for its maximum.
        ends = torch.searchsorted(sorted_experts, torch.arange(1, experts + 1, device=indices.device), out_int32=True)
        gate, up = grouped_linear(rows, self.gate_up_proj, ends).chunk(2, dim=-1)
        out = grouped_linear(self.act(gate) * up, self.down_proj, ends)
        # Weights are float32, so the weighted sum over the top-k accumulates in float32.
        weighted = out * weights.reshape(-1)[order, None]
        unsorted = torch.empty_like(weighted)
        unsorted[order] = weighted
        return unsorted.view(tokens, top_k, -1).sum(dim=1).to(x.dtype)


class TransformerLayer(nn.Module):
    def __init__(self, config: DiffusionGemmaTextConfig, shape: AttentionShape):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.layer_type = shape.layer_type
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = Attention(config, shape)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.mlp = DenseMLP(config)
        self.post_feedforward_layernorm_1 = RMSNorm(hidden, eps)
        self.router = Router(config)
        self.pre_feedforward_layernorm_2 = RMSNorm(hidden, eps)
        self.experts = Experts(config)
        self.post_feedforward_layernorm_2 = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)
        self.register_buffer("encoder_layer_scalar", torch.ones(1))
        self.register_buffer("decoder_layer_scalar", torch.ones(1))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend, scalar: torch.Tensor):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, attend))
        # The dense MLP and the experts read the same residual in parallel.
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        flat = x.reshape(-1, x.shape[-1])
        weights, indices = self.router(flat)
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), weights, indices)
        moe = self.post_feedforward_layernorm_2(moe.view(x.shape))
        x = x + self.post_feedforward_layernorm(dense + moe)
        return x * scalar
