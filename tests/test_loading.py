"""Checkpoints: loading the reference's files, saving files the reference loads, the tied-weight layouts,
shards, dtypes and devices, every error the loader promises, the hub cache, and peak memory."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusiongemma import (
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    DiffusionGemmaGenerationConfig,
    DiffusionGemmaModel,
)
from diffusiongemma.hf.loading import checkpoint_tensors

ENC = "model.encoder.language_model."
DEC = "model.decoder."
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def named(model) -> dict[str, torch.Tensor]:
    """Our tensors under the reference's (stored) names."""
    return {name: tensor for name, _, tensor, _, _ in checkpoint_tensors(model)}


def assert_same_tensors(a, b):
    a, b = named(a), named(b)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def copy_checkpoint(source, target, tensors=None):
    """A copy of the checkpoint folder `source`, optionally with other tensors in model.safetensors."""
    os.makedirs(target, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(target, name))
    if tensors is None:
        shutil.copy(os.path.join(source, WEIGHTS), os.path.join(target, WEIGHTS))
    else:
        save_file(tensors, os.path.join(target, WEIGHTS), metadata={"format": "pt"})
    return str(target)


def edit_config(folder, change):
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    change(config)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle)


def is_text_weight(name):
    """Stored once for both roles (the layer scalars and self-conditioning are decoder- or role-specific)."""
    return name.startswith(DEC) and "self_conditioning" not in name and not name.endswith("layer_scalar")


def small_text(**changes):
    text = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
                sliding_window=8, layer_types=["sliding_attention", "full_attention"], num_experts=4,
                top_k_experts=2, moe_intermediate_size=16)
    text.update(changes)
    return text


def our_small_model(seed=0, **text_changes):
    config = DiffusionGemmaConfig(text_config=small_text(**text_changes), vision_config=None, canvas_length=4,
                                  boi_token_id=None, eoi_token_id=None, image_token_id=None)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    with torch.no_grad():
        for tensor in named(model).values():
            tensor.copy_(torch.randn(tensor.shape))
    return model


@pytest.fixture(scope="module")
def loaded(reference_checkpoint):
    _, folder = reference_checkpoint
    return DiffusionGemmaForBlockDiffusion.from_pretrained(folder)


# --- the reference's checkpoint -----------------------------------------------------------------------


def test_every_tensor_equals_the_reference(reference_checkpoint, loaded):
    reference, _ = reference_checkpoint
    expected = reference.state_dict()
    covered = set()
    for name, aliases, tensor, _, _ in checkpoint_tensors(loaded):
        for alias in [name, *aliases]:
            if alias in expected:
                assert tensor.dtype == expected[alias].dtype == torch.float32, alias
                assert torch.equal(tensor, expected[alias]), alias
                covered.add(alias)
    # Every tensor of the reference, under every name it has (encoder, decoder, lm_head), was compared.
    assert covered == set(expected)
    assert "lm_head.weight" in covered and ENC + "embed_tokens.weight" in covered


def test_text_weights_are_shared_and_layer_scalars_are_per_role(reference_checkpoint, loaded):
    reference, _ = reference_checkpoint
    encoder = dict(loaded.model.encoder.language_model.backbone.named_parameters())
    decoder = dict(loaded.model.decoder.backbone.named_parameters())
    assert encoder.keys() == decoder.keys() and len(encoder) > 10
    assert all(encoder[name] is decoder[name] for name in encoder)
    reference_state = reference.state_dict()
    for i, layer in enumerate(loaded.model.backbone.layers):
        encoder_scalar = reference_state[f"{ENC}layers.{i}.layer_scalar"]
        decoder_scalar = reference_state[f"{DEC}layers.{i}.layer_scalar"]
        assert not torch.equal(encoder_scalar, decoder_scalar)  # the fixture randomises them apart
        assert torch.equal(layer.encoder_layer_scalar, encoder_scalar)
        assert torch.equal(layer.decoder_layer_scalar, decoder_scalar)


def test_loaded_model_matches_the_reference_forward(reference_checkpoint, loaded):
    reference, _ = reference_checkpoint
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 380, (2, 9), generator=generator)
    canvas = torch.randint(0, 380, (2, 8), generator=generator)
    with torch.no_grad():
        ours = loaded(input_ids=prompt, decoder_input_ids=canvas).logits
        expected = reference(input_ids=prompt, decoder_input_ids=canvas).logits
    assert not loaded.training
    assert (ours - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_the_model_without_head_loads_the_same_checkpoint(reference_checkpoint, loaded):
    _, folder = reference_checkpoint
    model = DiffusionGemmaModel.from_pretrained(folder)
    assert isinstance(model, DiffusionGemmaModel)
    assert_same_tensors(model, loaded.model)


def test_save_and_load_again_is_exact(reference_checkpoint, tmp_path):
    _, folder = reference_checkpoint
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder)
    model.generation_config = DiffusionGemmaGenerationConfig(
        max_denoising_steps=12, t_min=0.3, t_max=0.9, eos_token_id=[1, 106], pad_token_id=0,
        sampler_config={"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.2})
    model.save_pretrained(tmp_path / "first")
    assert sorted(os.listdir(tmp_path / "first")) == ["config.json", "generation_config.json", WEIGHTS]

    # The shared text weights are written once, under the decoder's names, as the reference writes them.
    stored = load_file(tmp_path / "first" / WEIGHTS)
    assert stored.keys() == load_file(os.path.join(folder, WEIGHTS)).keys() == named(model).keys()
    assert not any(name.startswith(ENC) and not name.endswith("layer_scalar") for name in stored)

    again = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "first")
    assert_same_tensors(again, model)
    assert again.generation_config.to_dict() == model.generation_config.to_dict()
    assert again.config.to_dict() == {**model.config.to_dict(), "dtype": "float32"}
    again.save_pretrained(tmp_path / "second")
    for name in ("config.json", "generation_config.json"):
        first = json.loads((tmp_path / "first" / name).read_text())
        assert first == json.loads((tmp_path / "second" / name).read_text()), name
    assert json.loads((tmp_path / "first" / "generation_config.json").read_text())["max_denoising_steps"] == 12


def test_the_reference_loads_what_we_save(reference_checkpoint, loaded, tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion as RefModel

    reference, folder = reference_checkpoint
    loaded.save_pretrained(tmp_path)
    from_ours = RefModel.from_pretrained(tmp_path).eval()
    from_own = RefModel.from_pretrained(folder).eval()
    expected = reference.state_dict()
    state = from_ours.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[name], expected[name]) for name in expected)

    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 380, (2, 6), generator=generator)
    canvas = torch.randint(0, 380, (2, 8), generator=generator)
    with torch.no_grad():
        logits = from_ours(input_ids=prompt, decoder_input_ids=canvas).logits
        assert torch.equal(logits, from_own(input_ids=prompt, decoder_input_ids=canvas).logits)
        ours = loaded(input_ids=prompt, decoder_input_ids=canvas).logits
    assert (ours - logits).abs().max() <= 1e-5 * logits.abs().max()


# --- tied tensors stored once, twice, with lm_head -----------------------------------------------------


def layouts(stored):
    decoder_only = dict(stored)
    encoder_only = {(ENC + name[len(DEC):] if is_text_weight(name) else name): t for name, t in stored.items()}
    both = {**stored, **{ENC + name[len(DEC):]: t.clone() for name, t in stored.items() if is_text_weight(name)}}
    with_head = {**stored, "lm_head.weight": stored[DEC + "embed_tokens.weight"].clone()}
    head_only = {**{k: v for k, v in stored.items() if k != DEC + "embed_tokens.weight"},
                 "lm_head.weight": stored[DEC + "embed_tokens.weight"].clone()}
    return dict(decoder_only=decoder_only, encoder_only=encoder_only, both=both, both_and_head={**both, **with_head},
                with_head=with_head, head_only=head_only)


@pytest.mark.parametrize("layout", ["decoder_only", "encoder_only", "both", "both_and_head", "with_head", "head_only"])
def test_tied_layouts_load_to_the_same_model(reference_checkpoint, loaded, layout, tmp_path):
    _, folder = reference_checkpoint
    tensors = layouts(load_file(os.path.join(folder, WEIGHTS)))[layout]
    if layout == "encoder_only":
        assert not any(is_text_weight(name) for name in tensors)
        assert f"{DEC}layers.0.layer_scalar" in tensors and f"{DEC}self_conditioning.up_proj.weight" in tensors
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(copy_checkpoint(folder, tmp_path, tensors))
    assert_same_tensors(model, loaded)
    encoder = dict(model.model.encoder.language_model.backbone.named_parameters())
    decoder = dict(model.model.decoder.backbone.named_parameters())
    assert all(encoder[name] is decoder[name] for name in encoder)


def test_copies_that_disagree_are_refused(reference_checkpoint, tmp_path):
    _, folder = reference_checkpoint
    tensors = layouts(load_file(os.path.join(folder, WEIGHTS)))["both"]
    tensors[ENC + "layers.1.mlp.up_proj.weight"] += 1
    with pytest.raises(ValueError, match=r"different values under 'model.decoder.layers.1.mlp.up_proj.weight' and "
                                         r"'model.encoder.language_model.layers.1.mlp.up_proj.weight'"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(copy_checkpoint(folder, tmp_path, tensors))


# --- shards -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_shard_size", ["300KB", 300_000])
def test_sharded_save_loads_back_and_the_reference_loads_it(loaded, reference_checkpoint, tmp_path, max_shard_size):
    from transformers import DiffusionGemmaForBlockDiffusion as RefModel

    reference, _ = reference_checkpoint
    loaded.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    files = sorted(os.listdir(tmp_path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert WEIGHTS not in files and INDEX in files and len(shards) > 2
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert all(os.path.getsize(tmp_path / shard) < 300_000 + 4_096 for shard in shards)
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["weight_map"].keys() == named(loaded).keys()
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in named(loaded).values())

    assert_same_tensors(DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path), loaded)
    state, expected = RefModel.from_pretrained(tmp_path).state_dict(), reference.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[n], expected[n]) for n in expected)

    # Saving unsharded into the same folder replaces the index, and the folder loads the single file.
    loaded.save_pretrained(tmp_path)
    assert INDEX not in os.listdir(tmp_path) and WEIGHTS in os.listdir(tmp_path)
    assert_same_tensors(DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path), loaded)


def test_bad_max_shard_size(loaded, tmp_path):
    with pytest.raises(ValueError, match=r"`max_shard_size` must be bytes or a string like '5GB', got '5 parsecs'"):
        loaded.save_pretrained(tmp_path, max_shard_size="5 parsecs")


# --- dtype and device -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), (torch.float16, torch.float16),
                                             ("float16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_load_in_half_precision(reference_checkpoint, loaded, dtype, expected):
    reference, folder = reference_checkpoint
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=dtype)
    assert model.dtype == expected
    state = reference.state_dict()
    for name, tensor in named(model).items():
        assert tensor.dtype == expected, name
        assert torch.equal(tensor, state[name].to(expected)), name
    # Rotary frequencies are computed, in float32, whatever the weights' dtype.
    rotary = dict(model.model.backbone.rotary.named_buffers())
    assert rotary.keys() == {"sliding_attention_inv_freq", "full_attention_inv_freq"}
    for name, buffer in loaded.model.backbone.rotary.named_buffers():
        assert rotary[name].dtype == torch.float32 and torch.equal(rotary[name], buffer), name
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7]]), decoder_input_ids=torch.arange(8)[None] + 10).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("dtype", [None, "auto", "float32", torch.float32])
def test_float32_checkpoint_loads_in_float32(reference_checkpoint, dtype):
    _, folder = reference_checkpoint
    assert DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=dtype).dtype == torch.float32


@pytest.mark.parametrize("layout", ["decoder_only", "encoder_only"])
def test_stored_half_precision_is_kept_without_a_dtype_in_config(tmp_path, layout):
    model = our_small_model().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["dtype"] == "bfloat16"
    assert DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "saved").dtype == torch.bfloat16

    # Without a `dtype` entry, the stored dtype decides, wherever the tied embedding is stored.
    tensors = layouts(load_file(tmp_path / "saved" / WEIGHTS))[layout]
    folder = copy_checkpoint(tmp_path / "saved", tmp_path / layout, tensors)
    edit_config(folder, lambda config: config.pop("dtype"))
    again = DiffusionGemmaForBlockDiffusion.from_pretrained(folder)
    assert again.dtype == torch.bfloat16
    assert_same_tensors(again, model)


def test_config_dtype_is_used_when_none_is_asked_for(reference_checkpoint, tmp_path):
    _, folder = reference_checkpoint
    folder = copy_checkpoint(folder, tmp_path)
    edit_config(folder, lambda config: config.update(dtype="bfloat16"))
    assert DiffusionGemmaForBlockDiffusion.from_pretrained(folder).dtype == torch.bfloat16
    assert DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype="float32").dtype == torch.float32


@pytest.mark.parametrize("dtype, message", [("float8", r"unsupported dtype 'float8'; choose one of"),
                                            ("fp16", r"unsupported dtype 'fp16'"),
                                            (torch.int8, r"unsupported dtype torch.int8")])
def test_bad_dtype(reference_checkpoint, dtype, message):
    _, folder = reference_checkpoint
    with pytest.raises(ValueError, match=message):
        DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=dtype)


def test_cuda_without_cuda(reference_checkpoint, monkeypatch):
    _, folder = reference_checkpoint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError, match="CUDA was asked for, but no CUDA device is available"):
            DiffusionGemmaForBlockDiffusion.from_pretrained(folder, device=device)
    assert DiffusionGemmaForBlockDiffusion.from_pretrained(folder, device="auto").device.type == "cpu"


# --- errors ---------------------------------------------------------------------------------------------


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no config.json in {tmp_path}"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path)


def test_config_without_weights(reference_checkpoint, tmp_path):
    _, folder = reference_checkpoint
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=f"no weights in {tmp_path}: expected {WEIGHTS} or {INDEX}"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path)


def test_index_errors(loaded, tmp_path):
    loaded.save_pretrained(tmp_path, max_shard_size="300KB")
    index_path = tmp_path / INDEX
    index = json.loads(index_path.read_text())
    shard = index["weight_map"][DEC + "norm.weight"]

    os.rename(tmp_path / shard, tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=rf"missing checkpoint shard {tmp_path / shard} \(listed in {INDEX}\)"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path)
    os.rename(tmp_path / "elsewhere", tmp_path / shard)

    other = next(s for s in index["weight_map"].values() if s != shard)
    wrong = {**index, "weight_map": {**index["weight_map"], DEC + "norm.weight": other}}
    index_path.write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match=rf"places tensor 'model.decoder.norm.weight' in {other}, which does not hold"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path)

    index_path.write_text("{}")
    with pytest.raises(ValueError, match=r"is corrupt: no valid `weight_map`"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path)


def edited(folder, tmp_path, change):
    tensors = load_file(os.path.join(folder, WEIGHTS))
    change(tensors)
    return copy_checkpoint(folder, tmp_path, tensors)


def test_missing_tensors_are_named(reference_checkpoint, tmp_path):
    _, folder = reference_checkpoint
    path = edited(folder, tmp_path / "one", lambda t: t.pop(DEC + "norm.weight"))
    with pytest.raises(ValueError, match=r"the checkpoint lacks 1 tensors: model.decoder.norm.weight$"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(path)
    path = edited(folder, tmp_path / "two", lambda t: [t.pop(f"{ENC}layers.{i}.layer_scalar") for i in (0, 2)])
    with pytest.raises(ValueError, match=r"lacks 2 tensors: model.encoder.language_model.layers.0.layer_scalar, "
                                         r"model.encoder.language_model.layers.2.layer_scalar$"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(path)
    popped = []
    path = edited(folder, tmp_path / "many",
                  lambda t: popped.extend(t.pop(n) for n in list(t) if n.startswith(DEC + "layers.3.")))
    assert len(popped) > 8
    with pytest.raises(ValueError, match=rf"lacks {len(popped)} tensors: (model.decoder.layers.3.[^,]*, ){{8}}"
                                         rf"\.\.\. \({len(popped) - 8} more\)$"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(path)


def test_unexpected_tensors_are_named(reference_checkpoint, tmp_path):
    _, folder = reference_checkpoint
    path = edited(folder, tmp_path, lambda t: t.update({DEC + "layers.0.bogus.weight": torch.zeros(2)}))
    with pytest.raises(ValueError,
                       match=r"holds 1 tensors this model does not have: model.decoder.layers.0.bogus.weight"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(path)


def test_shape_mismatch_names_tensor_and_shapes(reference_checkpoint, tmp_path):
    _, folder = reference_checkpoint
    path = edited(folder, tmp_path, lambda t: t.update({DEC + "layers.1.self_attn.q_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(ValueError, match=r"tensor 'model.decoder.layers.1.self_attn.q_proj.weight' has shape "
                                         r"\[64, 64\] in the checkpoint, but the config implies \[128, 64\]"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(path)


def test_unsupported_model_type(reference_checkpoint, tmp_path):
    _, folder = reference_checkpoint
    folder = copy_checkpoint(folder, tmp_path)
    edit_config(folder, lambda config: config.update(model_type="gemma4"))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gemma4'; this engine runs 'diffusion_gemma'"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(folder)


def header_file(header: bytes, declared: int | None = None) -> bytes:
    return (len(header) if declared is None else declared).to_bytes(8, "little") + header


@pytest.mark.parametrize("content", [
    bytes(range(7, 250, 3)) * 40,
    b"\x01\x02\x03",
    header_file(b"\xff\xfe not json at all"),
    header_file(b'{"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}') + bytes(16),
    header_file(b'{"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}') + bytes(8),
    header_file(b'{"a": "not an entry"}'),
    header_file(b"[1, 2, 3]"),
    # Tensors that do not lie back to back, or leave bytes over: the reads would take the wrong bytes.
    header_file(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}') + bytes(16),
    header_file(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}') + bytes(16),
], ids=["garbage", "too_short", "header_not_json", "wrong_byte_count", "unknown_dtype", "entry_not_object",
        "header_not_object", "gap", "bytes_left_over"])
def test_corrupt_safetensors(reference_checkpoint, tmp_path, content):
    _, folder = reference_checkpoint
    folder = copy_checkpoint(folder, tmp_path)
    path = os.path.join(folder, WEIGHTS)
    with open(path, "wb") as handle:
        handle.write(content)
    # The reason after the colon is safetensors' own.
    with pytest.raises(ValueError, match=rf"^{re.escape(path)} is corrupt or truncated: \S"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(folder)


def test_truncated_file(reference_checkpoint, tmp_path):
    _, folder = reference_checkpoint
    folder = copy_checkpoint(folder, tmp_path)
    path = os.path.join(folder, WEIGHTS)
    os.truncate(path, os.path.getsize(path) - 10)
    with pytest.raises(ValueError, match=rf"^{re.escape(path)} is corrupt or truncated: "):
        DiffusionGemmaForBlockDiffusion.from_pretrained(folder)


def test_every_dtype_safetensors_knows_reads_back(tmp_path):
    """The dtypes come from safetensors, FP8 and unsigned ones included, and each tensor's bytes from its own
    place in the file, whatever the order of the names."""
    from diffusiongemma.hf.loading import SafetensorsFile

    generator = torch.Generator().manual_seed(0)
    tensors = {"z_scalar": torch.tensor(2.5), "a_bf16": torch.randn(3, 5, generator=generator).bfloat16(),
               "m_fp8": torch.randn(7, generator=generator).to(torch.float8_e4m3fn),
               "b_fp8_e5m2": torch.randn(2, 3, generator=generator).to(torch.float8_e5m2),
               "u16": torch.tensor([0, 9000, 65535], dtype=torch.uint16),
               "u32": torch.tensor([0, 2**31, 2**32 - 1], dtype=torch.uint32),
               "flags": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / WEIGHTS)
    stored = SafetensorsFile(str(tmp_path / WEIGHTS))
    assert stored.entries.keys() == tensors.keys()
    def raw(tensor):
        return tensor.reshape(-1).view(torch.uint8)

    for name, tensor in tensors.items():
        read = stored.read(name)
        assert read.dtype == tensor.dtype and read.shape == tensor.shape, name
        assert torch.equal(raw(read), raw(tensor)), name
        into = torch.empty_like(tensor)
        stored.read_into(name, into)
        assert torch.equal(raw(into), raw(tensor)), name


def test_a_dtype_pytorch_cannot_hold_is_named(tmp_path):
    from diffusiongemma.hf.loading import SafetensorsFile

    path = tmp_path / WEIGHTS
    path.write_bytes(header_file(b'{"a": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}') + bytes(2))
    with pytest.raises(ValueError, match=r"tensor 'a' has dtype F4, which PyTorch cannot hold"):
        SafetensorsFile(str(path))


def test_paths_that_are_not_checkpoint_folders(reference_checkpoint, tmp_path):
    _, folder = reference_checkpoint
    file = os.path.join(folder, "config.json")
    with pytest.raises(ValueError, match=rf"{file} is a file; pass the checkpoint folder that holds config.json"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(file)
    missing = str(tmp_path / "nowhere" / "at" / "all")
    with pytest.raises(FileNotFoundError, match=f"no checkpoint folder at {missing}"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(missing)


# --- repo ids through the Hugging Face cache -------------------------------------------------------------


@pytest.fixture
def hub_cache(reference_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _, folder = reference_checkpoint
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--tiny-diffusiongemma"
    copy_checkpoint(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return tmp_path / "cache", commit


def test_repo_id_loads_from_the_hub_cache_offline(hub_cache, loaded):
    cache, commit = hub_cache
    model = DiffusionGemmaForBlockDiffusion.from_pretrained("someone/tiny-diffusiongemma", cache_dir=cache)
    assert_same_tensors(model, loaded)
    # Extra keyword arguments reach huggingface_hub.snapshot_download.
    model = DiffusionGemmaForBlockDiffusion.from_pretrained("someone/tiny-diffusiongemma", cache_dir=str(cache),
                                                            revision=commit, dtype="float32")
    assert_same_tensors(model, loaded)


def test_repo_id_through_hf_hub_cache(hub_cache, loaded, monkeypatch):
    import huggingface_hub.constants

    cache, _ = hub_cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert_same_tensors(DiffusionGemmaForBlockDiffusion.from_pretrained("someone/tiny-diffusiongemma"), loaded)


def test_repo_id_not_in_the_cache_offline(hub_cache):
    cache, _ = hub_cache
    with pytest.raises(FileNotFoundError, match=r"someone/not-cached is neither a local folder nor in the Hugging Face "
                                                r"cache, and it could not be downloaded \(offline mode"):
        DiffusionGemmaForBlockDiffusion.from_pretrained("someone/not-cached", cache_dir=cache)


# --- memory -----------------------------------------------------------------------------------------------

MEMORY_SCRIPT = r"""
import sys
import psutil, torch
import diffusiongemma


def peak_rss():
    # The peak RSS of this address space. Not resource.getrusage(RUSAGE_SELF).ru_maxrss: on Linux that
    # carries over the parent's peak through fork and exec, so it reads pytest's size, not this load's.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


# Warm-up on a tiny checkpoint: the first model built on the meta device imports torch's meta kernels
# (about 80 MB of RSS, whatever the checkpoint's size); that one-time cost is not what is measured.
diffusiongemma.DiffusionGemmaForBlockDiffusion.from_pretrained(sys.argv[2])
try:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak to the current RSS (Linux >= 4.0)
except OSError:
    pass
before = psutil.Process().memory_info().rss
model = diffusiongemma.DiffusionGemmaForBlockDiffusion.from_pretrained(sys.argv[1])
peak = peak_rss()
assert model.model.backbone.embed_tokens.weight.shape == (49152, 1024)
print(peak - before)
"""


def test_peak_memory_of_a_load_is_about_the_checkpoint(tmp_path):
    big = tmp_path / "big"
    config = DiffusionGemmaConfig(
        text_config=small_text(vocab_size=49152, hidden_size=1024, intermediate_size=256, head_dim=128,
                               global_head_dim=256, moe_intermediate_size=64),
        vision_config=None, canvas_length=16, boi_token_id=None, eoi_token_id=None, image_token_id=None)
    DiffusionGemmaForBlockDiffusion(config).save_pretrained(big)
    our_small_model().save_pretrained(tmp_path / "tiny")
    size = os.path.getsize(big / WEIGHTS)
    assert size > 200e6  # the embedding alone is 192 MiB in float32, most of the file

    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(big), str(tmp_path / "tiny")],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    increase = int(result.stdout.strip().splitlines()[-1])
    # Measured with this script for this 233 MB file (2 CPU cores, Linux): 1.00x with this loader;
    # 2.01x for a naive load (safetensors.torch.load_file, then copying into a model built normally);
    # 2.00x when the whole file is first read into tensors of its own; 1.73x when each tensor is staged
    # in a temporary before the copy (the embedding is most of the file). A loader that holds the
    # weights twice, even one tensor at a time, fails here.
    assert increase < 1.3 * size, f"peak RSS grew by {increase / size:.2f}x the checkpoint's size"
    # The weights are resident after the load, so a smaller figure means the measurement is broken.
    assert increase > 0.8 * size, f"peak RSS grew by only {increase / size:.2f}x the checkpoint's size"


def test_a_missing_relative_path_is_not_taken_for_a_hub_id():
    from diffusiongemma.hf.loading import resolve_folder

    with pytest.raises(FileNotFoundError, match=r"no checkpoint folder at \./nope"):
        resolve_folder("./nope")
