"""Weight-only quantized weights: the schemes (int8, int4, fp8 e4m3), their storage, quantizing and
dequantizing, and the modules that hold quantized weights (`QuantizedWeight`, `QuantizedLinear`). Which of the
model's weights are quantized, and with which scheme, is `model.quantization`'s business.

Activations keep the compute dtype. On the CPU a product dequantizes its weight to the activations' dtype (in
float32, rounded once) and multiplies as the full-precision model does (torch's packed int8 and int4 CPU
operators measured slower than that: docs/quantization.md), so a quantized model computes what the
full-precision model computes with the rounded weights, and keeps its batch invariance. On CUDA the fused
experts' kernel reads the codes and scales itself (`fused.grouped_linear`), for the experts and, as one expert
that gets every row, for the projections; scales it cannot read (an fp8 checkpoint's per-tensor or per-block
ones) are dequantized first.

Storage, for a weight [..., out, in] (`...`: the experts' dimension, if any), every scheme symmetric:
- int8: codes int8 in [-127, 127], `weight_scale` float32 [..., out, 1] (one scale per output channel);
- int4: codes in [-7, 7] stored plus 8 as two per byte (uint8 [..., out, in / 2], the even input column in
  the low nibble), `weight_scale` bfloat16 [..., out, in / group] (one scale per group of `group` inputs);
- fp8: codes float8_e4m3fn, `weight_scale` float32 [..., out, 1]; a pre-quantized checkpoint may bring
  other scale shapes (one per tensor, or per block of [out / rows, in / columns]), which dequantize alike.
A weight's value is code times the scale of its block. Design notes and measurements: docs/quantization.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import fused

DEFAULT_INT4_GROUP = 32
FP8 = torch.float8_e4m3fn
# Codes whose scale would be zero (an all-zero row or group) are zero whatever the scale; any positive one does.
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme: "int8", "int4" (with its group size) or "fp8"."""

    name: str
    group_size: int | None = None

    def __str__(self) -> str:
        return f"int4-g{self.group_size}" if self.name == "int4" else self.name


INT8 = Scheme("int8")


def parse_scheme(text: str) -> Scheme:
    """"int8", "int4" (groups of 32 inputs), "int4-gN" (groups of N) or "fp8"."""
    if text in ("int8", "fp8"):
        return Scheme(text)
    match = re.fullmatch(r"int4(?:-g(\d+))?", text)
    if match is None:
        raise ValueError(f"unknown quantization {text!r}; choose int8, int4 (or int4-gN for groups of N inputs) "
                         "or fp8")
    group = int(match.group(1)) if match.group(1) else DEFAULT_INT4_GROUP
    if group < 2 or group % 2:
        raise ValueError(f"quantization {text!r}: the int4 group size must be an even number of at least 2")
    return Scheme("int4", group)


def fp8_supported(device: torch.device) -> bool:
    """Whether `device` computes with e4m3 weights natively: a CUDA GPU of compute capability 8.9 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def check_device(scheme: Scheme, device: torch.device) -> None:
    if scheme.name == "fp8" and not fp8_supported(device):
        where = (f"{torch.cuda.get_device_name(device)} (compute capability "
                 f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))})" if device.type == "cuda"
                 else f"the {device.type.upper()}")
        raise ValueError(f"fp8 weights need a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, "
                         f"Blackwell), not {where}; choose int8 or int4")


def storage(shape: tuple[int, ...], scheme: Scheme) -> tuple[tuple[tuple[int, ...], torch.dtype], ...]:
    """((codes' shape, dtype), (scales' shape, dtype)) of a weight of `shape` [..., out, in] under `scheme`."""
    *lead, out, inner = shape
    if scheme.name == "int4":
        if inner % scheme.group_size:
            raise ValueError(f"int4 groups of {scheme.group_size} do not divide a weight's {inner} inputs "
                             f"(shape {list(shape)}); choose a group size that divides every projection's input "
                             "size, e.g. int4-g32")
        return ((*lead, out, inner // 2), torch.uint8), ((*lead, out, inner // scheme.group_size), torch.bfloat16)
    return ((*shape,), torch.int8 if scheme.name == "int8" else FP8), ((*lead, out, 1), torch.float32)


def quantize(weight: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of `weight` [..., out, in], stored as `storage` says."""
    (_, _), (scale_shape, scale_dtype) = storage(tuple(weight.shape), scheme)
    blocks = _blocked(weight.float(), scale_shape)
    largest = {"int8": 127.0, "int4": 7.0, "fp8": torch.finfo(FP8).max}[scheme.name]
    # The codes are computed with the scale as stored, so that code * stored scale is the value kept.
    scale = (blocks.abs().amax(dim=(-3, -1), keepdim=True) / largest).clamp_min(_TINY).to(scale_dtype)
    scaled = blocks / scale.float()
    if scheme.name == "fp8":
        codes = scaled.to(FP8)
    else:
        codes = scaled.round_().clamp_(-largest, largest)
    codes = codes.reshape(weight.shape)
    if scheme.name == "int4":
        nibbles = (codes + 8).to(torch.uint8)
        codes = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    elif scheme.name == "int8":
        codes = codes.to(torch.int8)
    return codes, scale.reshape(scale_shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight [..., out, in] that `codes` and `scale` stand for, in `dtype`. uint8 codes are int4 pairs;
    the scale's last two dimensions divide the weight's into blocks (a scale with fewer dimensions is one
    per tensor)."""
    if codes.dtype == torch.uint8:
        codes = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2).view(torch.int8) - 8
    elif codes.dtype == FP8:
        codes = codes.to(dtype)  # exactly: every e4m3 number is a bfloat16, float16 and float32 number
    if scale.dim() < 2:
        scale = scale.reshape(1, 1)
    weight = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    # One pass: the products in float32 (the scale's type), each rounded once into `dtype`; a bfloat16 product
    # would round the scale and then the product.
    torch.mul(_blocked(codes, scale.shape), _blocked(scale.float(), scale.shape, spread=False),
              out=_blocked(weight, scale.shape))
    return weight


def _blocked(x: torch.Tensor, scale_shape: tuple[int, ...], spread: bool = True) -> torch.Tensor:
    """x [..., out, in] viewed as [..., rows, out / rows, columns, in / columns] for a scale of
    [..., rows, columns]; with spread=False, x is that scale, viewed as [..., rows, 1, columns, 1]."""
    rows, columns = scale_shape[-2:]
    if not spread:
        return x.reshape(*x.shape[:-2], rows, 1, columns, 1)
    out, inner = x.shape[-2:]
    if out % rows or inner % columns:
        raise ValueError(f"a weight of shape {list(x.shape)} cannot be split into the {rows} x {columns} blocks "
                         "its scales describe")
    return x.reshape(*x.shape[:-2], rows, out // rows, columns, inner // columns)


class QuantizedWeight(nn.Module):
    """A weight [..., out, in] stored as codes (`weight`) and scales (`weight_scale`), both buffers. The
    experts' 3-D weights take this form; `kernels.experts.grouped_linear` reads or dequantizes them. A checkpoint
    names the codes as the full-precision weight and the scales with `_scale` appended (`stored_suffix`)."""

    def __init__(self, shape: tuple[int, ...], scheme: Scheme, scale_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.shape, self.scheme = torch.Size(shape), scheme
        (codes_shape, codes_dtype), (default_scale_shape, scale_dtype) = storage(self.shape, scheme)
        self.register_buffer("weight", torch.empty(codes_shape, dtype=codes_dtype))
        self.register_buffer("weight_scale", torch.empty(scale_shape or default_scale_shape, dtype=scale_dtype))

    def stored_suffix(self, attr: str) -> str:
        return "_scale" if attr == "weight_scale" else ""

    def set(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        self.weight.copy_(codes)
        self.weight_scale.copy_(scale)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, dtype)

    def _apply(self, fn, recurse=True):
        # A model's cast to another dtype (model.to(torch.float32)) must leave codes and scales as they are;
        # moves to another device apply.
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, tensor in before.items():
            if tensor is not None and self._buffers[name].dtype != tensor.dtype:
                self._buffers[name] = tensor.to(self._buffers[name].device)
        return self

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, scheme={self.scheme}"


class QuantizedLinear(QuantizedWeight):
    """`nn.Linear` with a quantized weight; a checkpoint names its tensors as a Linear's (`weight`,
    `weight_scale`, `bias`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: Scheme,
                 scale_shape: tuple[int, ...] | None = None):
        super().__init__((out_features, in_features), scheme, scale_shape)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def stored_suffix(self, attr: str) -> str:
        return "." + attr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.takes(x) and fused.reads_codes(self.weight, self.weight_scale):
            # On CUDA the experts' kernel reads the codes, as one expert that gets every row.
            rows = x.reshape(-1, x.shape[-1])
            ends = torch.full((1,), rows.shape[0], dtype=torch.int32, device=x.device)
            out = fused.grouped_linear(rows, self.weight[None], ends, self.weight_scale[None]).view(*x.shape[:-1], -1)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.dequantize(x.dtype), self.bias)
