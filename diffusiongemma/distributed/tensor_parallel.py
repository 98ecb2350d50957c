"""Tensor- and expert-parallel inference: a model built on the meta device, sharded over a one-dimensional
mesh of N ranks before its weights are read, so that each rank allocates and reads only its share.

What each rank holds, per transformer layer (every rank sees every token; activations are replicated):
- attention: 1/N of the query heads (`q_proj` split by output rows, `o_proj` by input columns, with
  `parallelize_module`'s ColwiseParallel/RowwiseParallel: one all-reduce after `o_proj`). Key/value
  projections are split the same way where N divides their heads; where their K heads divide N instead,
  each rank holds the one head its query heads read, shared with the N/K - 1 other ranks that read it;
- dense MLP: 1/N of the intermediate units (gate/up by rows, down by columns; one all-reduce);
- experts: E/N whole experts (`ExpertShard`, expert parallel). The router runs on every rank and picks
  the same experts; each rank runs the (token, expert) pairs that fall on its experts and the weighted
  sums are all-reduced. Whole experts keep each expert's products as large as in one process, where
  splitting every expert's matrices N ways would make E·N small products per layer; as tokens are
  replicated already, no all-to-all is needed, only the one all-reduce a row-parallel layer costs. The
  price is imbalance: a rank whose experts draw more tokens makes the others wait.
- the tied embedding: 1/N of the vocabulary rows (`VocabShard`). Looking up a token is done by the rank
  that holds it (an all-reduce of exact values and zeros: bit-exact); the LM head's scores are gathered,
  so that every rank holds the whole vocabulary's logits and runs the same sampler with the same seed
  to the same tokens; the self-conditioning product multiplies each rank's share of the probabilities by
  its rows and all-reduces.
Everything else (norms, router, self-conditioning MLP, vision tower) is replicated.

The sums of the all-reduces run in another order than one process's, so logits agree with one process's to
rounding (about 1e-6 relative in float32), not in every bit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from ..kernels.experts import grouped_linear
from ..model.config import DiffusionGemmaConfig
from ..model.layers import Experts, TokenEmbedding


def check_divisible(config: DiffusionGemmaConfig, size: int) -> None:
    """Raises ValueError when `size` ranks cannot share the model's heads, units, experts or vocabulary."""
    text = config.text_config
    if size < 1:
        raise ValueError(f"the tensor-parallel size must be at least 1, got {size}")
    counts = [("attention heads", text.num_attention_heads), ("dense MLP units", text.intermediate_size),
              ("experts", text.num_experts), ("vocabulary entries", text.vocab_size)]
    for name, count in counts:
        if count % size:
            raise ValueError(f"tensor-parallel size {size} does not divide the model's {count} {name}")
    for shape in text.attention_shapes:
        heads = shape.num_key_value_heads
        if heads % size and size % heads:
            raise ValueError(f"tensor-parallel size {size} neither divides nor is a multiple of the {heads} "
                             f"key/value heads of the model's {shape.layer_type} layers")


def _sharded_parameter(full: torch.Tensor, mesh: DeviceMesh) -> nn.Parameter:
    """The rank's rows of `full` (a meta tensor) as a DTensor sharded over dimension 0."""
    local = torch.empty((full.shape[0] // mesh.size(), *full.shape[1:]), dtype=full.dtype, device="meta")
    return nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False), requires_grad=False)


def _first_row(parameter: nn.Parameter) -> int:
    return parameter.device_mesh.get_local_rank() * parameter.to_local().shape[0]


def _all_reduce(tensor: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    dist.all_reduce(tensor, group=mesh.get_group())
    return tensor


class ExpertShard(nn.Module):
    """This rank's E/N experts of one layer; stands in for `Experts` (same state-dict names)."""

    def __init__(self, experts: Experts, mesh: DeviceMesh):
        super().__init__()
        self.mesh = mesh
        self.gate_up_proj = _sharded_parameter(experts.gate_up_proj, mesh)
        self.down_proj = _sharded_parameter(experts.down_proj, mesh)
        self.act = experts.act

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.gate_up_proj.to_local(), self.down_proj.to_local()
        count, top_k = gate_up.shape[0], indices.shape[1]
        # Pairs routed to other ranks' experts get index `count`, sort last and are left out.
        local = indices - _first_row(self.gate_up_proj)
        local = local.masked_fill((local < 0) | (local >= count), count)
        sorted_experts, order = torch.sort(local.reshape(-1))
        ends = torch.searchsorted(sorted_experts, torch.arange(1, count + 1, device=x.device), out_int32=True)
        order = order[:int(ends[-1])]
        tokens = order // top_k
        gate, up = grouped_linear(x.index_select(0, tokens), gate_up, ends).chunk(2, dim=-1)
        out = grouped_linear(self.act(gate) * up, down, ends)
        # float32 sums, as in one process, then over the ranks.
        summed = torch.zeros(x.shape[0], out.shape[-1], dtype=torch.float32, device=x.device)
        summed.index_add_(0, tokens, out * weights.reshape(-1)[order, None])
        return _all_reduce(summed, self.mesh).to(x.dtype)


class VocabShard(nn.Module):
    """This rank's rows of the tied embedding; stands in for `TokenEmbedding` (same state-dict name)."""

    def __init__(self, embedding: TokenEmbedding, mesh: DeviceMesh):
        super().__init__()
        self.mesh = mesh
        self.weight = _sharded_parameter(embedding.weight, mesh)

    def _rows(self) -> tuple[torch.Tensor, int]:
        return self.weight.to_local(), _first_row(self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows, first = self._rows()
        local = input_ids - first
        elsewhere = (local < 0) | (local >= rows.shape[0])
        found = F.embedding(local.masked_fill(elsewhere, 0), rows).masked_fill(elsewhere[..., None], 0)
        return _all_reduce(found, self.mesh)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        rows, _ = self._rows()
        local = F.linear(hidden, rows).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.mesh.size())]
        dist.all_gather(parts, local, group=self.mesh.get_group())
        return torch.cat(parts, dim=-1)

    def expected(self, probs: torch.Tensor) -> torch.Tensor:
        rows, first = self._rows()
        return _all_reduce(torch.matmul(probs[..., first:first + rows.shape[0]], rows), self.mesh)



def parallelize(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shards a `BlockDiffusionLM` built on the meta device over `mesh` (see the module's docstring), in
    place; its weights are then allocated and read rank by rank (`hf.loading`)."""
    check_divisible(model.config, mesh.size())
    text = model.config.text_config
    backbone = (model.model if hasattr(model, "model") else model).backbone
    key_value_meshes = {heads: _key_value_mesh(mesh, heads)
                        for heads in sorted({s.num_key_value_heads for s in text.attention_shapes})}
    for layer, shape in zip(backbone.layers, text.attention_shapes):
        parallelize_module(layer, mesh, {"self_attn.q_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
                                         "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                                         "mlp.down_proj": RowwiseParallel()})
        key_value = [p for p in ("k_proj", "v_proj") if getattr(layer.self_attn, p) is not None]
        parallelize_module(layer.self_attn, key_value_meshes[shape.num_key_value_heads],
                           {p: ColwiseParallel() for p in key_value})
        layer.experts = ExpertShard(layer.experts, mesh)
    backbone.embed_tokens = VocabShard(backbone.embed_tokens, mesh)
    return model


def _key_value_mesh(mesh: DeviceMesh, heads: int) -> DeviceMesh:
    """The mesh a layer kind's K key/value heads are split over. Rank r's query heads read key/value heads from
    r·K/N on: with N dividing K, the whole mesh splits them; with K dividing N, consecutive groups of N/K
    ranks share one head, so the ranks are laid out as a K x N/K grid and the heads split along its first
    dimension (a rank holds head r // (N/K), as do the others of its group)."""
    size = mesh.size()
    if heads % size == 0:
        return mesh
    grid = init_device_mesh(mesh.device_type, (heads, size // heads), mesh_dim_names=("key_value", "sharing"))
    return grid["key_value"]
