"""Block-diffusion training: the objective's parts against hand computations, the data layout against
`generate`'s, a smoke run whose loss falls, exact resume, LoRA, recipes and the `train` command."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusiongemma import DiffusionGemmaForBlockDiffusion
from diffusiongemma.engine.generate import DiffusionGemmaGenerationConfig
from diffusiongemma.hf.chat_fixture import write_tokenizer
from diffusiongemma.hf.loading import checkpoint_tensors
from diffusiongemma.hf.processing import AutoProcessor
from diffusiongemma.model.config import (
    FULL,
    SLIDING,
    DiffusionGemmaConfig,
    DiffusionGemmaTextConfig,
)
from diffusiongemma.training.data import (
    canvas_examples,
    collate,
    epoch_batches,
    read_chats,
)
from diffusiongemma.training.lora import LoRALinear, apply_lora, lora_merged
from diffusiongemma.training.objective import (
    ObjectiveSettings,
    block_diffusion_loss,
    canvas_loss,
    corrupt_canvas,
    decode,
    encode,
    sample_noise_levels,
)
from diffusiongemma.training.trainer import (
    TrainingConfig,
    initialize_weights,
    learning_rate,
    train,
)

CANVAS = 8


@pytest.fixture(scope="module")
def start_model(tmp_path_factory):
    """A freshly initialized tiny text-only model with the fixture tokenizer."""
    folder = tmp_path_factory.mktemp("start")
    special = write_tokenizer(folder, 384)
    eos = [special["eos_token"], special["end_of_turn_token"]]
    text = DiffusionGemmaTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, num_global_key_value_heads=1, head_dim=16,
                                    global_head_dim=16, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
                                    vocab_size=384, sliding_window=8, max_position_embeddings=256,
                                    layer_types=[SLIDING, FULL], pad_token_id=special["pad_token"],
                                    bos_token_id=special["bos_token"], eos_token_id=eos)
    config = DiffusionGemmaConfig(text_config=text, vision_config=None, canvas_length=CANVAS,
                                  boi_token_id=special["boi_token"], eoi_token_id=special["eoi_token"],
                                  image_token_id=special["image_token"])
    model = DiffusionGemmaForBlockDiffusion(config)
    initialize_weights(model, seed=0)
    model.generation_config = DiffusionGemmaGenerationConfig(eos_token_id=eos, pad_token_id=special["pad_token"])
    model.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    return folder


def _chats(count: int, offset: int = 0) -> list[dict]:
    chats = []
    for i in range(offset, offset + count):
        a, b = i % 7, i % 5
        question = f"What is {a} plus {b}?"
        # Every third answer is long enough for two canvases.
        answer = f"{a} plus {b} is {a + b}." + (" Adding numbers is easy." if i % 3 == 0 else "")
        chats.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return chats


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for name, chats in (("train.jsonl", _chats(48)), ("eval.jsonl", _chats(8, offset=100))):
        (folder / name).write_text("".join(json.dumps(c) + "\n" for c in chats))
    return folder


def _recipe(start_model, data, output, **overrides) -> TrainingConfig:
    settings = dict(model=str(start_model), train_data=str(data / "train.jsonl"), eval_data=str(data / "eval.jsonl"),
                    output=str(output), steps=8, batch_size=8, learning_rate=3e-3, warmup_steps=2, log_every=100,
                    threads=1)
    settings.update(overrides)
    return TrainingConfig.from_dict(settings)


class Quiet:
    def __init__(self):
        self.messages = []

    def update(self, *args, **kwargs):
        pass

    def message(self, text):
        self.messages.append(text)


def test_canvas_loss_matches_a_hand_computation():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]])
    target = torch.tensor([[0, 1]])
    expected = -(math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
                 + math.log(math.exp(0.5) / (2 * math.exp(0.5) + math.exp(3)))) / 2
    assert canvas_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_corruption_keeps_the_noise_level_it_was_given():
    generator = torch.Generator().manual_seed(0)
    vocab, rows, length = 50, 4, 50_000
    canvas = torch.randint(0, vocab, (rows, length), generator=generator)
    levels = torch.tensor([0.0, 0.1, 0.5, 0.9])
    noisy, redrawn = corrupt_canvas(canvas, levels, vocab, generator)
    assert torch.equal(noisy[~redrawn], canvas[~redrawn])
    for row, level in enumerate(levels.tolist()):
        spread = 4 * math.sqrt(level * (1 - level) / length) + 1e-9
        assert abs(redrawn[row].float().mean().item() - level) <= spread
        # A redraw is uniform over the vocabulary, so it keeps the clean token with probability 1/vocab.
        changed = level * (1 - 1 / vocab)
        assert abs((noisy[row] != canvas[row]).float().mean().item() - changed) <= spread
    draws = noisy[3][redrawn[3]]
    counts = torch.bincount(draws, minlength=vocab).float()
    expected = draws.numel() / vocab
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 100  # 49 degrees of freedom: far below this unless the draws are not uniform


def test_noise_levels_cover_eps_to_one():
    levels = sample_noise_levels(20_000, 0.25, torch.Generator().manual_seed(1))
    assert levels.min() >= 0.25 and levels.max() <= 1.0
    assert levels.mean().item() == pytest.approx(0.625, abs=0.01)


def test_examples_are_the_canvases_generate_writes(start_model, data):
    processor = AutoProcessor.from_pretrained(start_model)
    tokenizer = processor.tokenizer
    chats = read_chats(data / "train.jsonl")
    examples = canvas_examples(chats[:1], processor, CANVAS, 256)
    messages = chats[0]
    prompt = processor.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True)[0]
    answer = tokenizer.encode(messages[1]["content"], add_special_tokens=False) + [
        tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    assert len(examples) == math.ceil(len(answer) / CANVAS) >= 2
    for index, example in enumerate(examples):
        assert example.context == prompt + answer[:index * CANVAS]
        part = answer[index * CANVAS:(index + 1) * CANVAS]
        assert example.target == part + [tokenizer.pad_token_id] * (CANVAS - len(part))


def test_batches_pad_contexts_on_the_left_and_score_only_answer_tokens(start_model, data):
    processor = AutoProcessor.from_pretrained(start_model)
    examples = canvas_examples(read_chats(data / "train.jsonl")[:1], processor, CANVAS, 256)[:2]
    pad = processor.tokenizer.pad_token_id
    batch = collate(examples, pad)
    short, long = len(examples[0].context), len(examples[1].context)
    assert batch.input_ids.shape == (2, long)
    assert batch.attention_mask[0].tolist() == [False] * (long - short) + [True] * short
    assert batch.positions[0, long - short:].tolist() == list(range(short))
    assert batch.positions[1].tolist() == list(range(long))
    # The first canvas has no answer in its context; the second predicts the first canvas's tokens.
    assert (batch.encoder_targets[0] == -100).all()
    assert batch.encoder_targets[1, -CANVAS:].tolist() == examples[1].context[-CANVAS:]
    assert (batch.encoder_targets[1, :-CANVAS] == -100).all()
    assert batch.answer_mask.tolist() == [[t != pad for t in e.target] for e in examples]


def test_epochs_cover_every_example_once_in_a_seeded_order(start_model, data):
    processor = AutoProcessor.from_pretrained(start_model)
    examples = canvas_examples(read_chats(data / "train.jsonl"), processor, CANVAS, 256)
    first = epoch_batches(examples, 8, seed=3, epoch=0)
    assert sorted(i for batch in first for i in batch) == list(range(len(examples)))
    assert first == epoch_batches(examples, 8, seed=3, epoch=0)
    assert first != epoch_batches(examples, 8, seed=3, epoch=1)


def test_a_padded_training_batch_gives_each_row_its_generate_logits(start_model, data):
    """The training forward (differentiable cache, left padding, per-row positions) computes what the
    inference path computes for each example alone."""
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(start_model).eval()
    processor = AutoProcessor.from_pretrained(start_model)
    examples = canvas_examples(read_chats(data / "train.jsonl")[:3], processor, CANVAS, 256)
    batch = collate(examples, processor.tokenizer.pad_token_id)
    canvas = torch.randint(0, 384, (len(examples), CANVAS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache, _ = encode(model, batch)
        batched = decode(model, cache, batch, canvas)
        for row, example in enumerate(examples):
            alone = model(input_ids=torch.tensor([example.context]), decoder_input_ids=canvas[row:row + 1]).logits
            torch.testing.assert_close(batched[row], alone[0], rtol=1e-5, atol=1e-5)


def assert_generates(folder):
    """`folder` is a complete model folder: it loads, with its processor, and generates."""
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    ids = processor.apply_chat_template([{"role": "user", "content": "What is 1 plus 2?"}], tokenize=True,
                                        add_generation_prompt=True, return_tensors="pt")
    out = model.generate(ids, max_new_tokens=CANVAS, max_denoising_steps=2)
    assert out.sequences.shape == (1, ids.shape[1] + CANVAS)
    return model


def test_training_lowers_the_loss_and_evaluates(start_model, data, tmp_path):
    result = train(_recipe(start_model, data, tmp_path / "run", steps=40, batch_size=16, eval_every=20),
                   progress=Quiet())
    losses = [entry["diffusion_loss"] for entry in result["history"]]
    assert len(losses) == 40
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8
    assert "encoder_loss" in result["history"][-1]
    first, last = result["evaluations"][0], result["evaluations"][-1]
    assert [first["step"], last["step"]] == [20, 40]
    assert 0 <= last["accuracy"] <= 1 and last["tokens"] > 0
    # The trained model is a complete checkpoint that generates.
    assert_generates(tmp_path / "run" / "final")


def test_resume_continues_exactly_from_a_checkpoint_that_is_a_model(start_model, data, tmp_path):
    whole = train(_recipe(start_model, data, tmp_path / "whole", steps=8, gradient_accumulation=2),
                  progress=Quiet())
    recipe = _recipe(start_model, data, tmp_path / "split", steps=8, gradient_accumulation=2, save_every=4)
    train(recipe, progress=Quiet())
    checkpoint = tmp_path / "split" / "checkpoint-4"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "chat_template.jinja", "training_state.pt"} <= set(os.listdir(checkpoint))
    assert_generates(checkpoint)
    # Interrupted after step 4: only the step-4 checkpoint is left.
    shutil.rmtree(tmp_path / "split" / "checkpoint-8")
    progress = Quiet()
    resumed = train(recipe, resume=True, progress=progress)
    assert progress.messages[0] == f"resuming from {checkpoint} at step 4 of 8"
    assert resumed["history"] == whole["history"]
    assert resumed["evaluations"] == whole["evaluations"]
    assert [e["step"] for e in resumed["history"]] == list(range(1, 9))


def test_resume_without_a_checkpoint_creates_nothing(start_model, data, tmp_path):
    with pytest.raises(ValueError, match="nothing to resume"):
        train(_recipe(start_model, data, tmp_path / "empty"), resume=True, progress=Quiet())
    assert not (tmp_path / "empty").exists()


def test_a_checkpoint_of_the_older_layout_is_refused_by_name(start_model, data, tmp_path):
    # Before checkpoints were model folders they held only the training state, weights included.
    (tmp_path / "run" / "checkpoint-3").mkdir(parents=True)
    torch.save({"step": 3}, tmp_path / "run" / "checkpoint-3" / "training_state.pt")
    with pytest.raises(ValueError, match=r"checkpoint-3 lacks training_state.pt or config.json: it was written by an "
                                         r"older version"):
        train(_recipe(start_model, data, tmp_path / "run"), resume=True, progress=Quiet())


def test_an_earlier_run_is_replaced_only_when_asked(start_model, data, tmp_path):
    train(_recipe(start_model, data, tmp_path / "run", steps=2, save_every=1), progress=Quiet())
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-1", "checkpoint-2", "final", "recipe.json"]
    before = (tmp_path / "run" / "final" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"run holds an earlier run \(checkpoint-1, checkpoint-2, final\); continue "
                                         r"it with --resume or replace it with --overwrite"):
        train(_recipe(start_model, data, tmp_path / "run", steps=1, learning_rate=1e-2), progress=Quiet())
    assert (tmp_path / "run" / "final" / "model.safetensors").read_bytes() == before
    with pytest.raises(ValueError, match="exclude each other"):
        train(_recipe(start_model, data, tmp_path / "run"), resume=True, overwrite=True, progress=Quiet())
    # Replaced, the old checkpoints go too: a later --resume must not pick up the old run's step 2.
    train(_recipe(start_model, data, tmp_path / "run", steps=1, learning_rate=1e-2), overwrite=True,
          progress=Quiet())
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-1", "final", "recipe.json"]
    assert (tmp_path / "run" / "final" / "model.safetensors").read_bytes() != before


def test_lora_trains_adapters_only_and_merges_into_plain_weights(start_model):
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(start_model)
    ids = torch.tensor([[2, 40, 41, 42]])
    canvas = torch.tensor([[50] * CANVAS])
    before = model(input_ids=ids, decoder_input_ids=canvas).logits
    wrapped = apply_lora(model, rank=4, alpha=8)
    assert wrapped == 7 + 6 + 3  # attention (no v_proj on the full layer), dense MLPs, self-conditioning
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=canvas).logits, before)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_()
    adapted = model(input_ids=ids, decoder_input_ids=canvas).logits
    base_weight = model.model.backbone.layers[0].self_attn.q_proj.base.weight.clone()
    with lora_merged(model):
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        merged = model(input_ids=ids, decoder_input_ids=canvas).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    # Afterwards the adapters are back, over the same base weights.
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == wrapped
    assert torch.equal(model.model.backbone.layers[0].self_attn.q_proj.base.weight, base_weight)
    assert torch.equal(model(input_ids=ids, decoder_input_ids=canvas).logits, adapted)


@pytest.fixture(scope="module")
def lora_run(start_model, data, tmp_path_factory):
    """(recipe, result) of a LoRA run of 4 steps with a checkpoint every 2."""
    recipe = _recipe(start_model, data, tmp_path_factory.mktemp("lora") / "run", steps=4, save_every=2,
                     lora={"rank": 4, "alpha": 8})
    return recipe, train(recipe, progress=Quiet())


def lora_modules() -> set[str]:
    """The reference's names of the layers LoRA adapts in the start model (2 layers, the second full)."""
    names = {"model.decoder.self_conditioning." + p for p in ("gate_proj", "up_proj", "down_proj")}
    for layer, attention in ((0, "qkvo"), (1, "qko")):
        parts = [f"self_attn.{x}_proj" for x in attention] + [f"mlp.{x}_proj" for x in ("gate", "up", "down")]
        for role in ("model.decoder.", "model.encoder.language_model."):
            names |= {f"{role}layers.{layer}.{part}" for part in parts}
    return names


def test_a_lora_run_writes_the_merged_model_and_the_adapter_in_peft_layout(lora_run, start_model):
    recipe, result = lora_run
    assert len(result["history"]) == 4
    final = Path(recipe.output) / "final"
    tuned = assert_generates(final)
    base = DiffusionGemmaForBlockDiffusion.from_pretrained(start_model)
    # Embeddings are not adapted; the merged projections moved.
    assert torch.equal(tuned.model.backbone.embed_tokens.weight, base.model.backbone.embed_tokens.weight)
    layer, base_layer = tuned.model.backbone.layers[0], base.model.backbone.layers[0]
    assert not torch.equal(layer.self_attn.q_proj.weight, base_layer.self_attn.q_proj.weight)

    adapter = final / "adapter"
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "base_model_name_or_path", "bias")} == {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": str(Path(start_model).resolve()),
        "bias": "none"}
    assert set(config["target_modules"]) == lora_modules()
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors.keys() == {f"base_model.model.{m}.lora_{x}.weight" for m in lora_modules() for x in "AB"}
    q = "base_model.model.model.{}layers.0.self_attn.q_proj.lora_{}.weight"
    assert tensors[q.format("decoder.", "A")].shape == (4, 32) and tensors[q.format("decoder.", "B")].shape == (32, 4)
    # One adapter serves both roles, and it trained.
    assert torch.equal(tensors[q.format("decoder.", "B")], tensors[q.format("encoder.language_model.", "B")])
    assert tensors[q.format("decoder.", "B")].abs().sum() > 0

    # The adapter on its base is the merged model, bit for bit.
    on_base = DiffusionGemmaForBlockDiffusion.from_pretrained(start_model, adapter=adapter)
    for (name, _, ours, _, _), (_, _, merged, _, _) in zip(checkpoint_tensors(on_base), checkpoint_tensors(tuned)):
        assert torch.equal(ours, merged), name
    ids, canvas = torch.tensor([[2, 40, 41, 42]]), torch.tensor([[50] * CANVAS])
    with torch.no_grad():
        assert torch.equal(on_base(input_ids=ids, decoder_input_ids=canvas).logits,
                           tuned(input_ids=ids, decoder_input_ids=canvas).logits)


def test_a_lora_run_resumes_exactly_from_its_checkpoint(lora_run, tmp_path):
    recipe, result = lora_run
    shutil.copytree(recipe.output, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert os.listdir(checkpoint / "adapter") and (checkpoint / "training_state.pt").is_file()
    assert_generates(checkpoint)
    resumed = train(TrainingConfig.from_dict({**asdict(recipe), "output": str(tmp_path / "run")}), resume=True,
                    progress=Quiet())
    assert resumed["history"] == result["history"] and resumed["evaluations"] == result["evaluations"]


def _edit_adapter(folder, config=None, tensors=None):
    if config is not None:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text()))))
    if tensors is not None:
        path = folder / "adapter_model.safetensors"
        save_file(tensors(load_file(path)), path)


Q_A = "base_model.model.model.{}layers.1.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("config, tensors, message", [
    (lambda c: {**c, "peft_type": "PREFIX_TUNING"}, None, r"`peft_type` is 'PREFIX_TUNING'; only LoRA adapters"),
    (lambda c: {**c, "use_dora": True}, None, r"sets \['use_dora'\]; only plain LoRA adapters"),
    (lambda c: {**c, "r": 8}, None, r"the adapter's model.decoder.layers.0.mlp.down_proj has lora_A \[4, 64\] and "
                                    r"lora_B \[32, 4\]; rank 8 on this model needs \[8, 64\] and \[32, 8\]"),
    (None, lambda t: {k: v for k, v in t.items() if k != Q_A.format("encoder.language_model.")},
     r"holds only lora_B for model.encoder.language_model.layers.1.self_attn.q_proj"),
    (None, lambda t: {k: v for k, v in t.items() if "encoder.language_model.layers.1.self_attn.q_proj" not in k},
     r"changes model.decoder.layers.1.self_attn.q_proj but not model.encoder.language_model.layers.1.self_attn."
     r"q_proj; one set of text layers serves the encoder and the decoder"),
    (None, lambda t: {**t, Q_A.format("decoder."): t[Q_A.format("decoder.")] + 1},
     r"gives model.decoder.layers.1.self_attn.q_proj and model.encoder.language_model.layers.1.self_attn.q_proj "
     r"different weights"),
    (None, lambda t: {**t, "base_model.model.model.decoder.layers.0.router.scale.lora_A.weight": torch.zeros(4, 32),
                      "base_model.model.model.decoder.layers.0.router.scale.lora_B.weight": torch.zeros(32, 4)},
     r"changes 1 modules that are no linear layers of this model \(names as in the reference\): "
     r"model.decoder.layers.0.router.scale$"),
    (None, lambda t: {**t, "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_magnitude_vector":
                      torch.zeros(32)},
     r"holds 1 tensors that are no LoRA A or B of a linear layer: base_model.model.model.decoder.layers.0.self_attn."
     r"q_proj.lora_magnitude_vector$"),
], ids=["not_lora", "dora", "rank", "half_a_pair", "one_role", "roles_differ", "not_a_linear_layer", "dora_tensor"])
def test_adapters_this_engine_cannot_apply_exactly_are_refused(lora_run, start_model, tmp_path, config, tensors,
                                                               message):
    recipe, _ = lora_run
    folder = shutil.copytree(Path(recipe.output) / "final" / "adapter", tmp_path / "adapter")
    _edit_adapter(folder, config, tensors)
    with pytest.raises(ValueError, match=message):
        DiffusionGemmaForBlockDiffusion.from_pretrained(start_model, adapter=folder)


def test_an_adapter_folder_is_not_taken_for_a_model(lora_run):
    recipe, _ = lora_run
    adapter = Path(recipe.output) / "final" / "adapter"
    with pytest.raises(ValueError, match=rf"{adapter} holds a LoRA adapter, not a model: load the base model it was "
                                         rf"trained on with adapter="):
        DiffusionGemmaForBlockDiffusion.from_pretrained(adapter)


def test_learning_rate_warms_up_then_decays_to_the_minimum(start_model, data, tmp_path):
    recipe = _recipe(start_model, data, tmp_path, steps=100, warmup_steps=10, learning_rate=1e-3,
                     min_learning_rate=1e-4)
    rates = [learning_rate(recipe, step) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert rates[-1] == pytest.approx(1e-4, rel=0.01)


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "`steps` must be a positive integer"),
    ({"learning_rate": -1}, "`learning_rate` must be a number > 0"),
    ({"self_conditioning_p": 2}, "`self_conditioning_p` must be a probability"),
    ({"colour": "blue"}, r"unknown training settings \['colour'\]; known: \["),
    ({"lerning_rate": 1e-3}, r"unknown training settings \['lerning_rate'\] \(did you mean 'learning_rate'\?\); "
                             r"known: \[.*'learning_rate'"),
    ({"step": 5, "eval_dta": "x"}, r"\['eval_dta', 'step'\] \(did you mean 'eval_data' for 'eval_dta', 'steps' for "
                                   r"'step'\?\)"),
    ({"lora": {"rank": 4, "dropout": 0.1}}, r"unknown `lora` settings \['dropout'\]; known: rank, alpha"),
    ({"lora": {"rnak": 4}}, r"unknown `lora` settings \['rnak'\] \(did you mean 'rank'\?\)"),
    ({"device": "tpu"}, "`device` must be auto, cpu, cuda"),
    ({"lora": 8}, "`lora` must be a mapping"),
    ({"adam_betas": 0.9}, "`adam_betas` must be two numbers"),
])
def test_bad_recipes_are_refused_by_name(start_model, data, tmp_path, change, message):
    settings = dict(model=str(start_model), train_data=str(data / "train.jsonl"), output=str(tmp_path))
    with pytest.raises(ValueError, match=message):
        TrainingConfig.from_dict({**settings, **change})


def test_recipe_paths_are_relative_to_the_recipe_and_required_keys_are_named(tmp_path):
    (tmp_path / "recipe.yaml").write_text("model: start\ntrain_data: chats.jsonl\noutput: out\nsteps: 5\n")
    (tmp_path / "start").mkdir()
    recipe = TrainingConfig.from_yaml(tmp_path / "recipe.yaml")
    assert recipe.model == str(tmp_path / "start") and recipe.output == str(tmp_path / "out")
    assert recipe.train_data == str(tmp_path / "chats.jsonl") and recipe.steps == 5
    (tmp_path / "partial.yaml").write_text("model: start\n")
    with pytest.raises(ValueError, match=r"lacks \['output', 'train_data'\]"):
        TrainingConfig.from_yaml(tmp_path / "partial.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        TrainingConfig.from_yaml(tmp_path / "broken.yaml")


@pytest.mark.parametrize("key", ["train_data", "eval_data"])
def test_a_missing_data_file_is_named_with_its_recipe_key_before_anything_is_written(start_model, data, tmp_path, key):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(ValueError, match=rf"^`{key}` names no file: {missing}$"):
        train(_recipe(start_model, data, tmp_path / "out", **{key: str(missing)}), progress=Quiet())
    assert not (tmp_path / "out").exists()


def test_bad_chat_lines_are_refused_with_their_line_number(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"chats.jsonl:1: the chat has no assistant message"):
        read_chats(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=r"chats.jsonl:1: expected a JSON object"):
        read_chats(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]},
                                             {"role": "assistant", "content": "a cat"}]}) + "\n")
    with pytest.raises(ValueError, match=r"chats.jsonl:1: every message needs text 'content'"):
        read_chats(path)


def test_train_command(start_model, data, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {start_model}\ntrain_data: {data / 'train.jsonl'}\noutput: out\nsteps: 2\n"
                      "batch_size: 8\nwarmup_steps: 1\nthreads: 1\n")
    done = subprocess.run([sys.executable, "-m", "diffusiongemma", "train", str(recipe)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == 2
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "final" / "tokenizer.json").is_file()
    command = [sys.executable, "-m", "diffusiongemma", "train", str(recipe)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "holds an earlier run (checkpoint-2, final)" in done.stderr
    done = subprocess.run(command + ["--overwrite"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    done = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"resuming from {tmp_path / 'out' / 'checkpoint-2'} at step 2 of 2" in done.stderr

    recipe.write_text(f"model: {start_model}\ntrain_data: {data / 'train.jsonl'}\noutput: out\nsteps: -2\n")
    done = subprocess.run([sys.executable, "-m", "diffusiongemma", "train", str(recipe)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip() == "diffusiongemma: error: `steps` must be a positive integer, got -2"


def test_the_loss_runs_under_bfloat16_autocast(start_model, data):
    """The mixed precision the GPU trains in, here on the CPU: products in bfloat16, a finite loss, gradients
    for the experts and the encoder-only path."""
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(start_model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(start_model)
    examples = canvas_examples(read_chats(data / "train.jsonl")[:4], processor, CANVAS, 256)
    batch = collate(examples, processor.tokenizer.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = block_diffusion_loss(model, batch, ObjectiveSettings(), torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(loss.item()) and set(parts) == {"diffusion_loss", "encoder_loss"}
    layer = model.model.backbone.layers[0]
    assert layer.experts.gate_up_proj.grad.abs().sum() > 0
    assert layer.encoder_layer_scalar.grad is None  # a buffer, as in the checkpoint


def test_gradients_reach_the_encoder_through_the_cache(start_model, data):
    """With the encoder's own loss off, the encoder's keys and values still learn from the canvas loss."""
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(start_model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(start_model)
    batch = collate(canvas_examples(read_chats(data / "train.jsonl")[:2], processor, CANVAS, 256),
                    processor.tokenizer.pad_token_id)
    cache, _ = encode(model, batch)
    keys = [layer.keys for layer in cache.layers]
    for k in keys:
        k.retain_grad()
    canvas = torch.randint(0, 384, batch.target.shape, generator=torch.Generator().manual_seed(0))
    canvas_loss(decode(model, cache, batch, canvas), batch.target).backward()
    assert all(k.grad is not None and k.grad.abs().sum() > 0 for k in keys)


def test_progress_reports_loss_and_tokens_per_second_on_the_steps_it_shows():
    import io

    from diffusiongemma.training.trainer import Progress

    stream = io.StringIO()
    progress = Progress(total=10, stream=stream)
    progress.update(1, 0, 2.5, 1e-3, tokens=100, show=False)
    assert stream.getvalue() == ""
    progress.update(2, 0, 1.25, 5e-4, tokens=100, show=True)
    line = stream.getvalue()
    assert line.startswith("step 2/10  loss 1.2500  lr 5.00e-04  ") and line.endswith("min left\n")
    assert re.search(r"  [\d,]+ tokens/s  ", line)
    # A job's other ranks count without writing anywhere.
    silent = Progress(total=10, stream=None)
    silent.update(2, 0, 1.0, 1e-3, tokens=5, show=True)
    silent.message("eval at step 2")
    assert silent.tokens == 5
