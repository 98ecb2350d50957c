"""Tensor-parallel inference and FSDP2 training on two CPU processes (gloo), each test starting its own
torchrun job: sharded generation against one process, a failing rank, the CLI's --tensor-parallel, and
FSDP2 training against one process, resumed from its sharded checkpoint, with LoRA and activation
checkpointing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import start_model  # noqa: F401 (a fixture)

from diffusiongemma import DiffusionGemmaForBlockDiffusion
from diffusiongemma.distributed.tensor_parallel import check_divisible
from diffusiongemma.model.config import (
    FULL,
    SLIDING,
    DiffusionGemmaConfig,
    DiffusionGemmaTextConfig,
)
from diffusiongemma.training.trainer import TrainingConfig, train

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
# A job that has not finished by then hangs: the test fails instead of waiting.
JOB_TIMEOUT = 120


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def torchrun(*args, ranks: int = 2) -> subprocess.CompletedProcess:
    """`ranks` processes on this machine; `--standalone` picks a free port for the rendezvous."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=JOB_TIMEOUT, env=_env())


def one_process(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=JOB_TIMEOUT,
                          env=_env())


# --- tensor-parallel inference


@pytest.mark.parametrize("size", [2, 4])
def test_sharded_generation_gives_one_process_tokens_and_logits(checkpoint, tmp_path, size):
    """The tiny preset has 2 key/value heads on its sliding layers and 1 on its full one: 2 ranks split the
    first and share the second, 4 ranks share both (pairs of ranks hold one head)."""
    done = torchrun(WORKER, "compare", checkpoint, tmp_path, ranks=size)
    assert done.returncode == 0, done.stderr
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(size)]
    # Every rank commits the same tokens, and they are one process's; the logits agree to rounding only,
    # the all-reduces summing in another order.
    assert all(rank["tokens"] == ranks[0]["single_tokens"] for rank in ranks)
    # An unseeded generate draws the same numbers on every rank.
    assert all(rank["random_state"] == ranks[0]["random_state"] for rank in ranks)
    assert ranks[0]["logits_relative_error"] <= 1e-5
    assert not ranks[0]["logits_bit_equal"]  # were they, the comparison above would prove less than it claims
    # Each rank holds its shards: well under the whole model's weights.
    for rank in ranks:
        assert rank["local_bytes"] <= (0.6 if size == 2 else 0.4) * ranks[0]["single_bytes"]


def test_a_failing_rank_ends_the_job_with_its_error(checkpoint, tmp_path):
    done = torchrun(WORKER, "fail", checkpoint, tmp_path)
    assert done.returncode != 0
    assert "rank 1 failed on purpose at denoising step 3" in done.stderr
    assert "rank      : 1" in done.stderr  # torchrun's summary names the failed rank first


def test_generate_command_with_tensor_parallel_prints_once_what_one_process_prints(checkpoint):
    options = ["generate", checkpoint, "What is two plus two?", "--json", "--seed", "3", "--max-new-tokens", "32"]
    alone = one_process("-m", "diffusiongemma", *options)
    assert alone.returncode == 0, alone.stderr
    sharded = torchrun("-m", "diffusiongemma", *options, "--tensor-parallel", "2")
    assert sharded.returncode == 0, sharded.stderr
    lines = sharded.stdout.strip().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["token_ids"] == json.loads(alone.stdout)["token_ids"]


def test_chat_with_tensor_parallel_answers_rank_zeros_lines_as_one_process(checkpoint):
    """Rank 0 alone reads stdin; every rank acts on its lines, and rank 0 alone prints."""
    options = ["chat", checkpoint, "--seed", "5", "--max-new-tokens", "16"]
    messages = "What is two plus two?\nAnd three plus three?\n"
    alone = subprocess.run([sys.executable, "-m", "diffusiongemma", *options], input=messages, capture_output=True,
                           text=True, timeout=JOB_TIMEOUT, env=_env())
    assert alone.returncode == 0, alone.stderr
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "diffusiongemma", *options, "--tensor-parallel", "2"]
    sharded = subprocess.run(command, input=messages, capture_output=True, text=True, timeout=JOB_TIMEOUT,
                             env=_env())
    assert sharded.returncode == 0, sharded.stderr
    assert sharded.stdout == alone.stdout and alone.stdout.count("\n") >= 2


def test_commands_that_do_not_fit_the_job_are_one_line_errors(checkpoint):
    done = torchrun("-m", "diffusiongemma", "generate", checkpoint, "hi", "--tensor-parallel", "3")
    assert done.returncode != 0
    assert ("diffusiongemma: error (rank 0): --tensor-parallel 3 does not match the 2 processes torchrun started "
            "(WORLD_SIZE=2); give torchrun --nproc-per-node 3") in done.stderr
    done = torchrun("-m", "diffusiongemma", "generate", checkpoint, "hi")
    assert done.returncode != 0
    assert ("diffusiongemma: error (rank 1): torchrun started 2 processes, but without --tensor-parallel each would "
            "run the whole model alone: add --tensor-parallel 2") in done.stderr
    done = torchrun("-m", "diffusiongemma", "serve", checkpoint)
    assert done.returncode != 0
    assert ("diffusiongemma: error (rank 0): torchrun started 2 processes, but without --tensor-parallel each would "
            "run the whole model alone: add --tensor-parallel 2") in done.stderr
    done = torchrun("-m", "diffusiongemma", "serve", checkpoint, "--tensor-parallel", "3")
    assert done.returncode != 0
    assert "diffusiongemma: error (rank 1): --tensor-parallel 3 does not match the 2 processes" in done.stderr
    done = one_process("-m", "diffusiongemma", "serve", checkpoint, "--tensor-parallel", "2")
    assert done.returncode != 0
    assert done.stderr.strip() == ("diffusiongemma: error: a distributed run needs one process per rank: start it "
                                   "with torchrun, e.g. `torchrun --nproc-per-node 2 -m diffusiongemma ...`")


def test_sizes_that_do_not_divide_the_model_are_refused_by_name():
    text = DiffusionGemmaTextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, num_global_key_value_heads=1, head_dim=8,
                                    global_head_dim=8, num_experts=6, top_k_experts=2, moe_intermediate_size=8,
                                    vocab_size=64, layer_types=[SLIDING, FULL])
    config = DiffusionGemmaConfig(text_config=text, canvas_length=4)
    check_divisible(config, 2)  # the single global key/value head is kept whole on each rank
    with pytest.raises(ValueError, match="tensor-parallel size 4 does not divide the model's 6 experts"):
        check_divisible(config, 4)
    with pytest.raises(ValueError, match="tensor-parallel size 3 does not divide the model's 4 attention heads"):
        check_divisible(config, 3)
    text.num_attention_heads, text.num_key_value_heads, text.num_experts = 6, 3, 4
    with pytest.raises(ValueError, match="tensor-parallel size 2 neither divides nor is a multiple of the 3 "
                                         "key/value heads of the model's sliding_attention layers"):
        check_divisible(config, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rank_reads_exactly_its_slice_of_a_stored_tensor(tmp_path, dtype):
    from safetensors.torch import save_file

    from diffusiongemma.hf.loading import SafetensorsFile

    stored = torch.randn(4, 6, 10).to(torch.bfloat16)
    save_file({"before": torch.randn(3), "weights": stored}, tmp_path / "w.safetensors")
    file = SafetensorsFile(str(tmp_path / "w.safetensors"))
    for dim, start, stop in [(0, 2, 4), (1, 3, 6), (2, 0, 5), (2, 5, 10)]:
        target = torch.empty(stored.narrow(dim, start, stop - start).shape, dtype=dtype)
        file.read_into("weights", target, (dim, start, stop))
        assert torch.equal(target, stored.narrow(dim, start, stop - start).to(dtype))


def test_tp_plan_outside_torchrun_is_refused(checkpoint, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="start it with torchrun"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, tp_plan="auto")


# --- FSDP2 training


@pytest.fixture(scope="module")
def start(start_model):  # noqa: F811
    """test_training's tiny text-only model, with a few chats to train on."""
    folder = start_model
    chats = []
    for i in range(24):
        a, b = i % 7, i % 5
        # Every third answer is long enough for two canvases, so some batches score encoder tokens and some not.
        answer = f"{a} plus {b} is {a + b}." + (" Adding numbers is easy." if i % 3 == 0 else "")
        chats.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                   {"role": "assistant", "content": answer}]})
    (folder / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (folder / "eval.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats[:6]))
    return folder


class Quiet:
    def update(self, *args, **kwargs):
        pass

    def message(self, text):
        pass


def _recipe(start: Path, folder: Path, **overrides) -> Path:
    settings = dict(model=str(start), train_data=str(start / "train.jsonl"), eval_data=str(start / "eval.jsonl"),
                    output=str(folder / "out"), steps=4, batch_size=4, gradient_accumulation=2,
                    learning_rate=3e-3, warmup_steps=2, log_every=1, save_every=2, eval_every=2, threads=1)
    settings.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()))
    return folder / "recipe.yaml"


def _log(folder: Path) -> dict:
    return json.loads((folder / "out" / "final" / "training_log.json").read_text())


def _assert_close_history(sharded: list[dict], single: list[dict]) -> None:
    assert [e["step"] for e in sharded] == [e["step"] for e in single]
    for a, b in zip(sharded, single):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=0), (a["step"], key)


def _assert_close_weights(a: Path, b: Path) -> None:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-5, atol=1e-5, msg=name)


def test_fsdp_training_matches_one_process_and_resumes_from_sharded_checkpoints(start, tmp_path):
    single = train(TrainingConfig.from_yaml(_recipe(start, tmp_path / "single")), progress=Quiet())
    # Sharded before its weights are read; recomputing the feed-forward blocks changes no number.
    recipe = _recipe(start, tmp_path / "sharded", activation_checkpointing=True)
    done = torchrun("-m", "diffusiongemma", "train", recipe)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1  # rank 0 alone prints the summary
    sharded = _log(tmp_path / "sharded")
    _assert_close_history(sharded["history"], single["history"])
    _assert_close_history(sharded["evaluations"], single["evaluations"])
    # `final/` is a plain checkpoint that one process loads.
    _assert_close_weights(tmp_path / "sharded" / "out" / "final", tmp_path / "single" / "out" / "final")
    checkpoint = tmp_path / "sharded" / "out" / "checkpoint-2"
    assert sorted(p.name for p in (checkpoint / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    # Interrupted after step 2: resuming from its sharded checkpoint gives the uninterrupted run's losses.
    shutil.rmtree(tmp_path / "sharded" / "out" / "checkpoint-4")
    shutil.rmtree(tmp_path / "sharded" / "out" / "final")
    done = torchrun("-m", "diffusiongemma", "train", recipe, "--resume")
    assert done.returncode == 0, done.stderr
    assert f"resuming from {checkpoint} at step 2 of 4" in done.stderr
    resumed = _log(tmp_path / "sharded")
    _assert_close_history(resumed["history"], sharded["history"])
    _assert_close_history(resumed["evaluations"], sharded["evaluations"])

    # A sharded checkpoint is refused by one process, by name.
    with pytest.raises(ValueError, match="was written by a torchrun job"):
        train(TrainingConfig.from_yaml(recipe), resume=True, progress=Quiet())


def test_fsdp_lora_with_activation_checkpointing_matches_one_process(start, tmp_path):
    settings = dict(lora={"rank": 4, "alpha": 8}, activation_checkpointing=True, learning_rate=1e-2, save_every=0,
                    eval_every=0)
    single = train(TrainingConfig.from_yaml(_recipe(start, tmp_path / "single", **settings)), progress=Quiet())
    done = torchrun("-m", "diffusiongemma", "train", _recipe(start, tmp_path / "sharded", **settings))
    assert done.returncode == 0, done.stderr
    _assert_close_history(_log(tmp_path / "sharded")["history"], single["history"])
    final = tmp_path / "sharded" / "out" / "final"
    _assert_close_weights(final, tmp_path / "single" / "out" / "final")
    adapters = load_file(final / "adapter" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "single" / "out" / "final" / "adapter" / "adapter_model.safetensors")
    assert adapters.keys() == expected.keys() and adapters
    # The adapters moved: LoRA trained under FSDP2.
    assert any(bool(t.abs().max() > 0) for name, t in adapters.items() if "lora_B" in name)


def test_a_rank_failing_in_training_ends_the_job_with_its_error(start, tmp_path):
    done = torchrun(WORKER, "fail-training", _recipe(start, tmp_path), tmp_path)
    assert done.returncode != 0
    assert "rank 1 failed on purpose in training step 2" in done.stderr
    assert "rank      : 1" in done.stderr


def test_fsdp_refuses_accumulation_the_ranks_cannot_share(start, tmp_path):
    done = torchrun("-m", "diffusiongemma", "train", _recipe(start, tmp_path, gradient_accumulation=1))
    assert done.returncode != 0
    assert ("diffusiongemma: error (rank 0): `gradient_accumulation` (1) must be a multiple of the 2 ranks"
            in done.stderr)
