"""Low-rank adapters (LoRA) on the attention and MLP projections, for fine-tuning large checkpoints, and
their files in PEFT's layout.

Only the adapters train; the base weights stay frozen. `lora_merged` shows the model with the adapters
folded into plain linear layers, so a fine-tuned model saves, loads and runs like any other checkpoint.
`save_adapter` writes the adapters alone as PEFT does (`adapter_config.json`, `adapter_model.safetensors`),
named by the reference's module tree, so PEFT on the reference model and other tools read them;
`merge_adapter` folds such a folder into a loaded model (`from_pretrained(base, adapter=...)`).

One backbone serves the encoder and the decoder here, while the reference has a module for each role, so
an adapter on a text layer is written under both roles' names, and one read here must give both the same.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..hf.loading import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DECODER,
    ENCODER_TEXT,
    _listing,
)
from ..model.config import read_json

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
# PEFT settings that change what an adapter computes beyond W + (alpha / r) B A; an adapter with any of them
# on is refused rather than read as something it is not.
UNSUPPORTED = ("use_dora", "use_rslora", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern",
               "layer_replication", "lora_bias", "trainable_token_indices")


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """weight + scale * B @ A, summed in float32 and rounded once to the weight's dtype."""
    return (weight.float() + (lora_b.float() @ lora_a.float()) * scale).to(weight.dtype)


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
        """A plain linear layer with the adapter folded in; this layer and its base keep their weights."""
        with torch.device("meta"):
            linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            linear.weight = nn.Parameter(merged_weight(self.base.weight, self.lora_a, self.lora_b, self.scale))
        linear.bias = self.base.bias
        return linear


def lora_targets(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every linear layer an adapter may change, by its module name in the reference (the names PEFT gives
    its tensors), as (owner module, attribute); a text layer appears under its encoder and its decoder name."""
    core = model.model if hasattr(model, "model") else model
    targets = {}
    for name, owner in core.backbone.named_modules():
        for attr, child in owner.named_children():
            if isinstance(child, (nn.Linear, LoRALinear)):
                path = f"{name}.{attr}" if name else attr
                targets[DECODER + path] = targets[ENCODER_TEXT + path] = (owner, attr)
    for attr, child in core.decoder.self_conditioning.named_children():
        if isinstance(child, (nn.Linear, LoRALinear)):
            targets[f"{DECODER}self_conditioning.{attr}"] = (core.decoder.self_conditioning, attr)
    return targets


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=TARGETS) -> int:
    """Wraps every linear layer named in `targets` and freezes everything else; returns how many were wrapped."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    layers = {(id(owner), attr): (owner, attr) for owner, attr in lora_targets(model).values() if attr in targets}
    for owner, attr in layers.values():
        setattr(owner, attr, LoRALinear(getattr(owner, attr), rank, alpha))
    if not layers:
        raise ValueError(f"no linear layer is named one of {list(targets)}")
    return len(layers)


def _adapters(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for path, (owner, attr) in lora_targets(model).items():
        child = getattr(owner, attr)
        if isinstance(child, LoRALinear):
            yield path, child


@contextmanager
def lora_merged(model: nn.Module):
    """The model with plain linear layers, the adapters folded in, in place of its adapted ones (to save
    it); the adapters are back afterwards, their base weights untouched."""
    swapped = {(id(owner), attr): (owner, attr, getattr(owner, attr)) for owner, attr in lora_targets(model).values()
               if isinstance(getattr(owner, attr), LoRALinear)}
    for owner, attr, adapted in swapped.values():
        setattr(owner, attr, adapted.merged())
    try:
        yield model
    finally:
        for owner, attr, adapted in swapped.values():
            setattr(owner, attr, adapted)


def save_adapter(model: nn.Module, folder: str | os.PathLike, rank: int, alpha: float, base_model: str) -> None:
    """Writes the model's adapters in PEFT's layout; `base_model` is what `base_model_name_or_path` names."""
    from safetensors.torch import save_file

    tensors, modules = {}, []
    for path, adapted in _adapters(model):
        modules.append(path)
        # Copies: a text layer's adapter is written under both roles, and one file holds no shared memory.
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = adapted.lora_a.detach().to("cpu", copy=True)
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = adapted.lora_b.detach().to("cpu", copy=True)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    # Whole module names: PEFT matches a name by its ending, and the short ones (q_proj) would also match
    # the vision tower's layers, which are no plain linear layers and which PEFT then refuses.
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "r": rank,
              "lora_alpha": alpha, "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {}}
    with open(os.path.join(folder, ADAPTER_CONFIG), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
        handle.write("\n")


def read_adapter(model: nn.Module, folder: str | os.PathLike) -> tuple[float, list[tuple[nn.Module, str, torch.Tensor,
                                                                                          torch.Tensor]]]:
    """(alpha / r, [(owner module, attribute, A, B)]) of a PEFT LoRA adapter folder, checked against the model:
    every tensor must be the A or B of a linear layer the model has, with that layer's shape."""
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(folder, ADAPTER_CONFIG), os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {folder}")
    config = read_json(config_path)
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else None
        raise ValueError(f"{config_path}: `peft_type` is {found!r}; only LoRA adapters (\"LORA\") are read")
    on = [key for key in UNSUPPORTED if config.get(key)]
    if config.get("bias", "none") != "none":
        on.append("bias")
    if on:
        raise ValueError(f"{config_path} sets {on}; only plain LoRA adapters (W + alpha / r * B A) are read")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
        raise ValueError(f"{config_path}: `r` must be a positive integer, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0):
        raise ValueError(f"{config_path}: `lora_alpha` must be a number > 0, got {alpha!r}")
    if not os.path.exists(weights_path):
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {folder} (adapters are read from safetensors only)")

    pairs, strangers = {}, []
    for key, tensor in load_file(weights_path).items():
        match = PEFT_KEY.fullmatch(key)
        if match:
            pairs.setdefault(match[1], {})[match[2]] = tensor
        else:
            strangers.append(key)
    if strangers:
        raise ValueError(f"{weights_path} holds {len(strangers)} tensors that are no LoRA A or B of a linear "
                         f"layer: {_listing(sorted(strangers))}")
    targets = lora_targets(model)
    unknown = sorted(set(pairs) - set(targets))
    if unknown:
        raise ValueError(f"the adapter changes {len(unknown)} modules that are no linear layers of this model "
                         f"(names as in the reference): {_listing(unknown)}")
    layers = {}
    for path in sorted(pairs):
        if set(pairs[path]) != {"A", "B"}:
            raise ValueError(f"the adapter holds only lora_{''.join(pairs[path])} for {path}")
        owner, attr = targets[path]
        linear = getattr(owner, attr)
        linear = linear.base if isinstance(linear, LoRALinear) else linear
        a, b = pairs[path]["A"], pairs[path]["B"]
        if tuple(a.shape) != (rank, linear.in_features) or tuple(b.shape) != (linear.out_features, rank):
            raise ValueError(f"the adapter's {path} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; rank "
                             f"{rank} on this model needs {[rank, linear.in_features]} and "
                             f"{[linear.out_features, rank]}")
        twin = next((p for p, place in targets.items() if place == (owner, attr) and p != path), None)
        if twin is not None and twin not in pairs:
            raise ValueError(f"the adapter changes {path} but not {twin}; one set of text layers serves the "
                             "encoder and the decoder here, so both need the same adapter")
        if (id(owner), attr) in layers:
            _, _, first_a, first_b = layers[id(owner), attr]
            if not (torch.equal(first_a, a) and torch.equal(first_b, b)):
                raise ValueError(f"the adapter gives {twin} and {path} different weights; one set of text layers "
                                 "serves the encoder and the decoder here, so both need the same adapter")
            continue
        layers[id(owner), attr] = (owner, attr, a, b)
    return alpha / rank, list(layers.values())


@torch.no_grad()
def merge_adapter(model: nn.Module, folder: str | os.PathLike) -> None:
    """Folds a PEFT LoRA adapter folder into the model's weights."""
    scale, layers = read_adapter(model, folder)
    for owner, attr, a, b in layers:
        weight = getattr(owner, attr).weight
        weight.copy_(merged_weight(weight, a.to(weight.device), b.to(weight.device), scale))


@torch.no_grad()
def load_adapter_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Sets the model's adapters (as `apply_lora` made them) to those of a folder `save_adapter` wrote."""
    scale, layers = read_adapter(model, folder)
    adapted = {(id(owner), attr): getattr(owner, attr) for owner, attr in lora_targets(model).values()
               if isinstance(getattr(owner, attr), LoRALinear)}
    if {(id(owner), attr) for owner, attr, _, _ in layers} != set(adapted):
        raise ValueError(f"the adapter in {folder} does not adapt the layers this run adapts")
    for owner, attr, a, b in layers:
        layer = adapted[id(owner), attr]
        if layer.lora_a.shape != a.shape or layer.scale != scale:
            raise ValueError(f"the adapter in {folder} has rank {a.shape[0]} and alpha / rank {scale}; this run "
                             f"has rank {layer.lora_a.shape[0]} and alpha / rank {layer.scale}")
        layer.lora_a.copy_(a)
        layer.lora_b.copy_(b)
