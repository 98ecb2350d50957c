"""Running one model over several processes with torch.distributed, launched by `torchrun`.

- `runtime`: joining the job's process group (with a timeout) and its device mesh;
- `tensor_parallel`: sharding a model built on the meta device for tensor- and expert-parallel inference
  (`from_pretrained(..., tp_plan="auto")`, `--tensor-parallel N`);
- `fsdp`: FSDP2 training (`torchrun ... train RECIPE.yaml`).

Guide: docs/distributed.md.
"""
