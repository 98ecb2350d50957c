"""Low-rank adapters (LoRA) on the attention and MLP projections, for fine-tuning large checkpoints.

Only the adapters train; the base weights stay frozen. `merge_lora` folds the adapters back into plain
linear layers, so a fine-tuned model saves, loads and runs like any other checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        # B starts at zero, so the adapted model starts exactly as the base model.
        self.lora_b = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a * self.scale).to(self.base.weight.dtype)
        return self.base


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=TARGETS) -> int:
    """Wraps every linear layer named in `targets` and freezes everything else; returns how many were wrapped."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    wrapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
                wrapped += 1
    if not wrapped:
        raise ValueError(f"no linear layer is named one of {list(targets)}")
    return wrapped


def merge_lora(model: nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    for parameter in model.parameters():
        parameter.requires_grad_(True)
