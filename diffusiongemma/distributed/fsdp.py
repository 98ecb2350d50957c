"""FSDP2 training: `torchrun --nproc-per-node N -m diffusiongemma train RECIPE.yaml`.

The recipe means the same training at any world size: a step is `gradient_accumulation` micro-batches of
`batch_size` canvases, the same ones, drawn from the same generators, as in one process; the ranks share
them out (rank r takes micro-batches r, r + N, ...), so `gradient_accumulation` must be a multiple of N.
Each rank scales its losses by N / gradient_accumulation, because FSDP averages the ranks' gradients: the
averaged gradient is then one process's, to rounding.

Each transformer layer is one FSDP unit (`fully_shard`), and a root unit around the whole loss (`LossModule`)
holds the rest (embedding, final norm, self-conditioning, vision tower): parameters, gradients and AdamW's
state are sharded by dimension 0 over the ranks, gathered for a layer's forward and backward and freed after.
On CUDA the gathered parameters are bfloat16 and gradients are reduced in float32
(`MixedPrecisionPolicy`); on the CPU everything stays float32. Gradients sync on a rank's last micro-batch
of a step only. Every rank must gather and reduce the units in the same order, so the loss must make the same
passes, with the same autograd graph, for every batch (`block_diffusion_loss(..., fixed_passes=True)`).

A full fine-tune is sharded on the meta device, before its weights are read, and each rank reads its own
shards of the checkpoint only (`from_pretrained(..., sharding=run.shard)`). With LoRA every rank loads the
whole base model first (the loader knows no adapters), then shards it.

Checkpoints: the model and optimizer state in torch's distributed checkpoint format (`sharded/`, each rank
writing and reading its own shards), beside a model folder gathered on rank 0, so that every checkpoint can
be generated from, as in one process. `final/` is such a folder.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from . import runtime

SHARDED_FOLDER = "sharded"


def wanted() -> bool:
    """Whether this process is one of several that torchrun started."""
    return runtime.launched() and int(os.environ["WORLD_SIZE"]) > 1


class LossModule(nn.Module):
    """The root FSDP unit: its forward is the whole loss, so that the root's parameters are gathered for
    everything the loss does with the model (the encoder pass is no call of the model's own forward)."""

    def __init__(self, model: nn.Module, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, *args):
        return self.loss(self.model, *args)


class ShardedRun:
    """One rank's part of a training run over all the job's ranks."""

    def __init__(self, device: torch.device, gradient_accumulation: int, loss):
        """`loss(model, *args)`: what the root unit's call `root(*args)` computes."""
        self.mesh = runtime.start(device.type)
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        if gradient_accumulation % self.size:
            raise ValueError(f"`gradient_accumulation` ({gradient_accumulation}) must be a multiple of the "
                             f"{self.size} ranks: a step's micro-batches are shared out among them")
        self.device, self.loss = device, loss
        self.root: LossModule | None = None

    def shard(self, model: nn.Module) -> None:
        """Shards `model` in place, built on the meta device or loaded; the root unit becomes `self.root`."""
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.device.type == "cuda" else MixedPrecisionPolicy()
        for layer in model.model.backbone.layers:
            fully_shard(layer, mesh=self.mesh, mp_policy=policy)
        self.root = LossModule(model, self.loss)
        fully_shard(self.root, mesh=self.mesh, mp_policy=policy)

    def micro_batches(self, count: int) -> range:
        return range(self.rank, count, self.size)

    def loss_scale(self, count: int) -> float:
        return self.size / count

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (float64, so that a sum of two is exact)."""
        summed = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(summed)
        return summed.tolist()

    def save_state(self, root: LossModule, optimizer, folder) -> None:
        model_state, optimizer_state = get_state_dict(root, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state},
                 checkpoint_id=os.path.join(folder, SHARDED_FOLDER))

    def load_state(self, root: LossModule, optimizer, folder) -> None:
        model_state, optimizer_state = get_state_dict(root, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=os.path.join(folder, SHARDED_FOLDER))
        set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def gathered(self, root: LossModule) -> dict[str, torch.Tensor] | None:
        """The model's whole state dict on rank 0 (in CPU memory), None on the others; every rank must call."""
        state = get_model_state_dict(root.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.rank == 0 else None

    def barrier(self) -> None:
        dist.barrier()
