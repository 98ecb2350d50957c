"""The process group of a `torchrun` job, and its one-dimensional device mesh.

`torchrun` sets RANK, LOCAL_RANK and WORLD_SIZE for every process it starts; `start` joins that group (gloo
on the CPU, NCCL on CUDA) with a timeout, so that a rank left waiting on a peer that hangs fails with an
error instead of waiting for ever. A peer that raises ends the job sooner: torchrun stops the other ranks and
reports the failed rank's error.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

# Long enough for a rank to read its shards of a large checkpoint while a faster one waits at the first
# collective; short enough that a hung peer is noticed.
TIMEOUT = timedelta(minutes=10)


def launched() -> bool:
    """Whether this process was started by torchrun (or a launcher that sets the same variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def start(device_type: str = "cpu", size: int | None = None) -> DeviceMesh:
    """Joins the job's process group (once) and returns a mesh over all its ranks. `size`, when given, is the
    number of processes the caller expects: a job of another size is refused. On joining, every rank takes
    rank 0's random state (each process starts from a seed of its own): an unseeded `generate` then draws the
    same numbers on every rank, as the ranks' lockstep needs."""
    if not launched():
        raise ValueError("a distributed run needs one process per rank: start it with torchrun, e.g. "
                         "`torchrun --nproc-per-node 2 -m diffusiongemma ...`")
    world = int(os.environ["WORLD_SIZE"])
    if size is not None and size != world:
        raise ValueError(f"--tensor-parallel {size} does not match the {world} processes torchrun started "
                         f"(WORLD_SIZE={world}); give torchrun --nproc-per-node {size}")
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=TIMEOUT)
        torch.set_rng_state(from_leader(torch.get_rng_state()))
        if device_type == "cuda":
            torch.cuda.set_rng_state(from_leader(torch.cuda.get_rng_state()))
    return init_device_mesh(device_type, (world,))


def is_leader() -> bool:
    """Rank 0, or a process that is not part of a distributed job: the one that prints, streams and writes."""
    return not dist.is_initialized() or dist.get_rank() == 0


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def from_leader(value):
    """Rank 0's `value` on every rank (what rank 0 alone can read: its stdin). Returns `value` itself outside a
    job."""
    if not dist.is_initialized():
        return value
    box = [value if is_leader() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def leader_lines(lines):
    """Rank 0's `lines` on every rank, each as rank 0 reads it. A follower waits for the next line at most
    `TIMEOUT`: an interactive session left idle longer ends."""
    source = iter(lines) if is_leader() else None
    while (line := from_leader(next(source, None) if is_leader() else None)) is not None:
        yield line


def local_part(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int] | None] | None:
    """For a DTensor on a one-dimensional mesh (tensor parallelism's or FSDP's): (its local tensor, (dim, start,
    stop) of the full tensor it holds, or None when it holds all of it). None for a plain tensor. A dimension
    is sharded as torch shards it: rank r holds rows from r·ceil(size / N) on, the last ranks fewer or none."""
    if not isinstance(tensor, DTensor):
        return None
    (placement,) = tensor.placements
    local = tensor.to_local()
    if not isinstance(placement, Shard):
        return local, None
    dim = placement.dim % tensor.dim()
    chunk = -(-tensor.shape[dim] // tensor.device_mesh.size())
    start = min(tensor.device_mesh.get_local_rank() * chunk, tensor.shape[dim])
    return local, (dim, start, start + local.shape[dim])
