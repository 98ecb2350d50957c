"""Which of the model's weights quantization replaces, and with what (the formats and modules themselves are
`kernels.quantized`, re-exported here for the packages that may not import `kernels`).

What is quantized: the attention and dense-MLP projections of every layer and the self-conditioning MLP's
(`QuantizedLinear` in place of `nn.Linear`), and the experts' 3-D weights (`QuantizedWeight` in place of the
`gate_up_proj` and `down_proj` parameters). The embedding matrix (also the LM head), the norms, the router
and the vision tower keep their dtype. int4 keeps the attention's value path in int8 (`weight_scheme`).
Design notes and measurements: docs/quantization.md.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.quantized import (
    DEFAULT_INT4_GROUP,
    FP8,
    INT8,
    QuantizedLinear,
    QuantizedWeight,
    Scheme,
    check_device,
    dequantize,
    fp8_supported,
    parse_scheme,
    quantize,
    storage,
)

__all__ = ["DEFAULT_INT4_GROUP", "FP8", "INT8", "QuantizedLinear", "QuantizedWeight", "Scheme", "check_device",
           "dequantize", "fp8_supported", "parse_scheme", "quantizable", "quantize", "quantized_bytes", "replace",
           "storage", "weight_scheme"]


def quantizable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owner, attribute) of every weight that quantization replaces: the attention and dense-MLP
    projections and the experts' weights of each transformer layer, and the self-conditioning MLP's."""
    from .layers import Attention, DenseMLP, Experts
    from .network import SelfConditioning

    mlp = ("gate_proj", "up_proj", "down_proj")
    names = {Attention: ("q_proj", "k_proj", "v_proj", "o_proj"), DenseMLP: mlp, SelfConditioning: mlp,
             Experts: ("gate_up_proj", "down_proj")}
    found = []
    for module in model.modules():
        for kind, attrs in names.items():
            if type(module) is kind:
                found += [(module, attr) for attr in attrs if getattr(module, attr) is not None]
    return found


def weight_scheme(owner: nn.Module, attr: str, scheme: Scheme) -> Scheme:
    """The scheme of the weight `owner.attr` when a model is quantized with `scheme`. int4 keeps the attention's
    value path in int8: the projection that makes the values (v_proj; in full-attention layers, which have none,
    k_proj) and the output projection. Their errors reach the residual stream unnormalized, while the queries'
    and keys' go through the softmax; measured on the demo model, this halves int4's KL divergence from bf16
    for a few percent more bytes (docs/quantization.md)."""
    from .layers import Attention

    if scheme.name == "int4" and isinstance(owner, Attention) and (
            attr in ("v_proj", "o_proj") or (attr == "k_proj" and owner.v_proj is None)):
        return INT8
    return scheme


def replace(owner: nn.Module, attr: str, scheme: Scheme, scale_shape: tuple[int, ...] | None = None) -> None:
    """Puts an empty quantized stand-in for `owner.attr` (an nn.Linear, or a 3-D parameter) in its place,
    on the device the original is on."""
    original = getattr(owner, attr)
    with torch.device(original.weight.device if isinstance(original, nn.Linear) else original.device):
        if isinstance(original, nn.Linear):
            stand_in = QuantizedLinear(original.in_features, original.out_features, original.bias is not None,
                                       scheme, scale_shape)
        else:
            stand_in = QuantizedWeight(tuple(original.shape), scheme, scale_shape)
    delattr(owner, attr)
    setattr(owner, attr, stand_in)


def quantized_bytes(model: nn.Module, scheme: Scheme | None, dtype: torch.dtype) -> int:
    """Bytes of the model's weights in `dtype`, with the quantizable ones stored under `scheme` (None: not
    quantized). Works on a model built on the meta device."""
    total = sum(t.numel() for t in model.parameters()) * dtype.itemsize
    if scheme is None:
        return total
    for owner, attr in quantizable(model):
        weight = getattr(owner, attr)
        weight = weight.weight if isinstance(weight, nn.Linear) else weight
        total -= weight.numel() * dtype.itemsize
        total += sum(torch.Size(shape).numel() * kind.itemsize
                     for shape, kind in storage(tuple(weight.shape), weight_scheme(owner, attr, scheme)))
    return total
