"""Run by tests/test_distributed.py under torchrun (one process per rank), never collected by pytest.

    python -m torch.distributed.run --standalone --nproc-per-node 2 distributed_worker.py MODE CHECKPOINT OUT

MODE `compare`: the tensor-parallel model's tokens and logits, and what its rank holds, written to
OUT/rank-R.json; rank 0 also writes the same figures of the whole model in one process.
MODE `fail`: rank 1 raises in the middle of generation; the job must end with that error, not hang.
MODE `fail-training`: CHECKPOINT is a recipe; rank 1 raises in its second training step's loss.
MODE `fail-serving`: OUT is a port; `serve --tensor-parallel 2` on it, where rank 1 (a follower) raises in
the first tick that has a request running.
"""

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist

from diffusiongemma import DiffusionGemmaForBlockDiffusion

PROMPTS = [[2, 10, 20, 30, 40, 50], [2, 7, 300, 11, 12, 99, 5, 421, 17, 3, 8]]


def outputs(model) -> dict:
    tokens, logits = [], []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        torch.manual_seed(1234)
        tokens.append(model.generate(input_ids=ids, max_new_tokens=48, max_denoising_steps=12).sequences[0].tolist())
        canvas = torch.arange(model.config.canvas_length)[None] * 7 % model.config.text_config.vocab_size
        with torch.no_grad():
            logits.append(model(input_ids=ids, decoder_input_ids=canvas).logits)
    return {"tokens": tokens, "logits": logits}


def local_bytes(model) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes
               for t in list(model.parameters()) + list(model.buffers()))


class FailOnRankOne:
    """A logits processor that raises on rank 1 at the third denoising step."""

    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if dist.get_rank() == 1 and self.calls == 3:
            raise RuntimeError("rank 1 failed on purpose at denoising step 3")
        return scores


def fail_training(recipe: str) -> None:
    from diffusiongemma.training import trainer

    calls = {"count": 0}
    loss = trainer.block_diffusion_loss

    def failing_on_rank_one(*args, **kwargs):
        calls["count"] += 1
        if dist.get_rank() == 1 and calls["count"] == 2:
            raise RuntimeError("rank 1 failed on purpose in training step 2")
        return loss(*args, **kwargs)

    trainer.block_diffusion_loss = failing_on_rank_one
    trainer.train(trainer.TrainingConfig.from_yaml(recipe))


def fail_serving(checkpoint: str, port: str) -> None:
    from diffusiongemma.cli.main import main as command
    from diffusiongemma.serving.scheduler import Follower

    def failing_tick(self):
        if self.running:
            raise RuntimeError("rank 1 failed on purpose in a serving tick")

    Follower._tick = failing_tick
    sys.exit(command(["serve", checkpoint, "--tensor-parallel", "2", "--port", port, "--shutdown-timeout", "1"]))


def main(mode: str, checkpoint: str, out: str) -> None:
    torch.set_num_threads(1)
    if mode == "fail-training":
        fail_training(checkpoint)
        return
    if mode == "fail-serving":
        fail_serving(checkpoint, out)
        return
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, tp_plan="auto")
    rank = dist.get_rank()
    if mode == "fail":
        model.generate(input_ids=torch.tensor([PROMPTS[0]]), max_new_tokens=32, max_denoising_steps=8,
                       logits_processor=[FailOnRankOne()])
        return
    # Each process started from a random seed of its own; joining the job gave every rank rank 0's state.
    random_state = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
    sharded = outputs(model)
    report = {"tokens": sharded["tokens"], "random_state": random_state, "local_bytes": local_bytes(model)}
    if rank == 0:
        whole = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint)
        single = outputs(whole)
        report["single_tokens"] = single["tokens"]
        report["single_bytes"] = local_bytes(whole)
        report["logits_relative_error"] = max(
            ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(sharded["logits"], single["logits"]))
        report["logits_bit_equal"] = all(torch.equal(a, b) for a, b in zip(sharded["logits"], single["logits"]))
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as handle:
        json.dump(report, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
