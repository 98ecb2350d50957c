"""The typed config against the reference's: same derived facts from the same config.json, and a full
circle (reference -> ours -> reference) that changes nothing the model depends on."""

import copy
import json

import pytest
from transformers import DiffusionGemmaConfig as RefConfig

from diffusiongemma import DiffusionGemmaConfig, DiffusionGemmaTextConfig
from diffusiongemma.model.vision import VisionConfig

S, F = "sliding_attention", "full_attention"

BASE_TEXT = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, num_experts=8, top_k_experts=2, moe_intermediate_size=32, max_position_embeddings=4096)
TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=8, position_embedding_size=64, patch_size=4, standardize=True)

CASES = {
    # Default 5:1 pattern over 12 layers, both global shortcuts given, no bidirectional attention.
    "five_to_one": dict(text=dict(num_hidden_layers=12, global_head_dim=32, num_global_key_value_heads=1,
                                  sliding_window=12, use_bidirectional_attention=None), vision=None),
    # 4 layers, not a multiple of 6: the pattern gives S S S and the last layer is forced to full.
    "pattern_forced_last": dict(text=dict(num_hidden_layers=4, global_head_dim=32, sliding_window=10),
                                vision=TINY_VISION),
    # Explicit layer types, global kv heads given, vision-bidirectional, a vision tower.
    "explicit_vision": dict(text=dict(num_hidden_layers=4, layer_types=[S, F, S, F], global_head_dim=32,
                                      num_global_key_value_heads=1, sliding_window=12,
                                      use_bidirectional_attention="vision", eos_token_id=[1, 106]),
                            vision=TINY_VISION),
    # Neither global shortcut given: full layers take head_dim 512 and the sliding kv heads.
    "no_global_keys_all": dict(text=dict(num_hidden_layers=6, sliding_window=12, use_bidirectional_attention="all"),
                               vision=None),
    # "all" with an odd window (13 -> 7, written back as 12, as the reference does), custom RoPE,
    # global head_dim without global kv heads.
    "all_odd_window_custom_rope": dict(
        text=dict(num_hidden_layers=5, layer_types=[S, S, F, S, F], global_head_dim=24, sliding_window=13,
                  use_bidirectional_attention="all", pad_token_id=None,
                  rope_parameters={S: {"rope_type": "default", "rope_theta": 5_000.0},
                                   F: {"rope_type": "proportional", "rope_theta": 2e6, "partial_rotary_factor": 0.5}}),
        vision=TINY_VISION),
    # The per_layer_config form, with a layer overriding only its head_dim.
    "per_layer_config": dict(text=dict(num_hidden_layers=4, layer_types=[S, F, S, F], sliding_window=8,
                                       per_layer_config={"1": {"head_dim": 32, "num_key_value_heads": 1},
                                                         "3": {"head_dim": 32}}),
                             vision=None),
}


def reference_config(case, canvas_length=8):
    spec = CASES[case]
    return RefConfig(text_config={**BASE_TEXT, **spec["text"]}, vision_config=copy.deepcopy(spec["vision"]),
                     canvas_length=canvas_length, boi_token_id=381, eoi_token_id=382, image_token_id=383)


def shared_facts(config, text):
    """Facts that both configs expose under the same names."""
    return dict(
        layer_types=list(text.layer_types),
        sliding_window=text.sliding_window,
        bidirectional=text.use_bidirectional_attention,
        rope=json.loads(json.dumps(text.rope_parameters)),
        canvas_length=config.canvas_length,
        tokens=(config.boi_token_id, config.eoi_token_id, config.image_token_id, text.pad_token_id,
                text.bos_token_id, text.eos_token_id),
        sizes=(text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers,
               text.num_attention_heads, text.max_position_embeddings),
        experts=(text.num_experts, text.top_k_experts, text.moe_intermediate_size),
        numerics=(text.rms_norm_eps, text.final_logit_softcapping, text.hidden_activation),
    )


def vision_facts(vision, rope_theta):
    return None if vision is None else (
        vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads,
        vision.num_key_value_heads, vision.head_dim, vision.patch_size, vision.position_embedding_size,
        vision.pooling_kernel_size, vision.standardize, vision.use_clipped_linears, rope_theta)


def reference_facts(config):
    text, vision = config.text_config, config.vision_config
    return dict(
        shared_facts(config, text),
        shapes=[(text.per_layer_config[i].head_dim, text.per_layer_config[i].num_key_value_heads)
                for i in range(text.num_hidden_layers)],
        causal=text.use_bidirectional_attention != "all",
        vision=vision_facts(vision, vision and vision.rope_parameters["rope_theta"]),
    )


def our_facts(config: DiffusionGemmaConfig):
    text = config.text_config
    vision = None if config.vision_config is None else VisionConfig.from_dict(config.vision_config)
    return dict(
        shared_facts(config, text),
        shapes=[(s.head_dim, s.num_key_value_heads) for s in text.attention_shapes],
        causal=text.is_causal,
        vision=vision_facts(vision, vision and vision.rope_theta),
    )


def saved_json(reference: RefConfig, folder) -> dict:
    reference.save_pretrained(folder)
    with open(folder / "config.json", encoding="utf-8") as handle:
        return json.load(handle)


@pytest.mark.parametrize("case", list(CASES))
def test_reference_config_json_gives_the_same_derived_facts(case, tmp_path):
    reference = reference_config(case)
    ours = DiffusionGemmaConfig.from_dict(saved_json(reference, tmp_path))
    assert our_facts(ours) == reference_facts(reference)
    # Also via the file reader.
    assert our_facts(DiffusionGemmaConfig.from_json_file(tmp_path / "config.json")) == reference_facts(reference)


@pytest.mark.parametrize("case", list(CASES))
def test_full_circle_through_our_to_dict(case, tmp_path):
    reference = reference_config(case)
    file_json = saved_json(reference, tmp_path / "ref")
    ours = DiffusionGemmaConfig.from_dict(file_json)
    written = json.loads(json.dumps(ours.to_dict()))

    # The window written is the one the reference writes (the pre-halving value for "all").
    assert written["text_config"]["sliding_window"] == file_json["text_config"]["sliding_window"]
    assert written["model_type"] == "diffusion_gemma" and written["text_config"]["model_type"] == "diffusion_gemma_text"

    # The reference reads what we write, from a dict and from a folder, and derives the same facts.
    assert reference_facts(RefConfig.from_dict(copy.deepcopy(written))) == reference_facts(reference)
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "config.json").write_text(json.dumps(written))
    assert reference_facts(RefConfig.from_pretrained(tmp_path / "ours")) == reference_facts(reference)

    # And ours again: a fixed point.
    again = DiffusionGemmaConfig.from_dict(written)
    assert our_facts(again) == our_facts(ours)
    assert json.loads(json.dumps(again.to_dict())) == written


@pytest.mark.parametrize("window", [12, 13, 1024])
def test_all_mode_halves_the_window_once_and_writes_the_reference_value_back(window):
    text = {**BASE_TEXT, "num_hidden_layers": 2, "global_head_dim": 32, "sliding_window": window,
            "use_bidirectional_attention": "all"}
    ours = DiffusionGemmaTextConfig.from_dict(text)
    reference = RefConfig(text_config=copy.deepcopy(text)).text_config
    assert ours.sliding_window == window // 2 + 1 == reference.sliding_window
    assert ours.is_causal is False
    written = ours.to_dict()["sliding_window"]
    assert written == reference.to_dict()["sliding_window"] == (window // 2) * 2
    if window % 2 == 0:
        assert written == window  # the original value comes back for even windows
    # Reloading what was written halves once, not twice.
    assert DiffusionGemmaTextConfig.from_dict(ours.to_dict()).sliding_window == window // 2 + 1
    # Without "all", the window is taken as is.
    vision = DiffusionGemmaTextConfig.from_dict({**text, "use_bidirectional_attention": "vision"})
    assert vision.sliding_window == window


def released_text_config(form: str) -> dict:
    """text_config of google/diffusiongemma-26B-A4B-it, written as its config.json plausibly has it."""
    text = {
        "model_type": "diffusion_gemma_text", "vocab_size": 262144, "hidden_size": 2816, "intermediate_size": 2112,
        "num_hidden_layers": 30, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
        "num_experts": 128, "top_k_experts": 8, "moe_intermediate_size": 704, "sliding_window": 1024,
        "max_position_embeddings": 262144, "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh", "use_bidirectional_attention": "vision",
        "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1, "tie_word_embeddings": True,
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "layer_types": ([S] * 5 + [F]) * 5,
        "rope_parameters": {S: {"rope_type": "default", "rope_theta": 10000.0},
                            F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}},
        # Keys of the Gemma 4 family this engine does not read; they must survive a round trip.
        "attention_k_eq_v": True, "enable_moe_block": True, "dtype": "bfloat16",
    }
    if form == "global_keys":
        text.update(global_head_dim=512, num_global_key_value_heads=2)
    elif form == "per_layer_config":
        # Zero-padded keys, as the reference writes them.
        text["per_layer_config"] = {f"{i:02d}": {"head_dim": 512, "num_key_value_heads": 2}
                                    for i in (5, 11, 17, 23, 29)}
    elif form == "default_pattern":
        del text["layer_types"]
        text.update(global_head_dim=512, num_global_key_value_heads=2)
    return text


def released_config(form: str) -> dict:
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
        "canvas_length": 256, "tie_word_embeddings": True, "boi_token_id": 255999, "eoi_token_id": 258882,
        "image_token_id": 258880, "eos_token_id": [1, 106], "mm_tokens_per_image": 280, "dtype": "bfloat16",
        "initializer_range": 0.02, "text_config": released_text_config(form),
        "vision_config": {"model_type": "gemma4_vision", "hidden_size": 1152, "intermediate_size": 4304,
                          "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
                          "head_dim": 72, "patch_size": 16, "pooling_kernel_size": 3,
                          "position_embedding_size": 10240, "default_output_length": 280, "standardize": True,
                          "rope_parameters": {"rope_type": "axial", "rope_theta": 100.0}},
    }


@pytest.mark.parametrize("form", ["global_keys", "per_layer_config", "default_pattern"])
def test_released_checkpoint_config_shape(form):
    data = released_config(form)
    config = DiffusionGemmaConfig.from_dict(data)
    text = config.text_config
    full = [i for i, t in enumerate(text.layer_types) if t == F]
    assert full == [5, 11, 17, 23, 29]
    for i, shape in enumerate(text.attention_shapes):
        expected = (F, 512, 2) if i in full else (S, 256, 8)
        assert (shape.layer_type, shape.head_dim, shape.num_key_value_heads) == expected, i
        assert shape.is_sliding == (i not in full)
    assert text.sliding_window == 1024 and text.is_causal
    assert (text.num_attention_heads, text.hidden_size, text.vocab_size) == (16, 2816, 262144)
    assert (text.num_experts, text.top_k_experts, text.moe_intermediate_size) == (128, 8, 704)
    assert text.rope_parameters[F] == {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}
    assert text.rope_parameters[S] == {"rope_type": "default", "rope_theta": 1e4}
    assert (config.canvas_length, config.boi_token_id, config.eoi_token_id, config.image_token_id) == \
        (256, 255999, 258882, 258880)
    assert VisionConfig.from_dict(config.vision_config).head_dim == 72

    # The reference derives the same shapes from the same dict and from what we write.
    assert reference_facts(RefConfig.from_dict(copy.deepcopy(data))) == our_facts(config)
    written = json.loads(json.dumps(config.to_dict()))
    assert reference_facts(RefConfig.from_dict(copy.deepcopy(written))) == our_facts(config)
    # Keys we do not interpret are written back, at both levels.
    assert written["mm_tokens_per_image"] == 280 and written["eos_token_id"] == [1, 106]
    assert written["dtype"] == "bfloat16"
    assert written["text_config"]["attention_k_eq_v"] is True and written["text_config"]["enable_moe_block"] is True
    assert written["vision_config"]["default_output_length"] == 280


def test_unknown_keys_survive_a_round_trip():
    data = released_config("global_keys")
    data["my_top_level_key"] = {"nested": [1, 2, 3]}
    data["text_config"]["my_text_key"] = "kept"
    config = DiffusionGemmaConfig.from_dict(data)
    assert config.extra["my_top_level_key"] == {"nested": [1, 2, 3]}
    assert config.text_config.extra["my_text_key"] == "kept"
    written = config.to_dict()
    assert written["my_top_level_key"] == {"nested": [1, 2, 3]}
    assert written["text_config"]["my_text_key"] == "kept"
    assert DiffusionGemmaConfig.from_dict(written).to_dict() == written
    # from_dict does not consume the caller's dict.
    assert data["text_config"]["my_text_key"] == "kept" and "model_type" in data


def test_direct_construction_defaults():
    text = DiffusionGemmaTextConfig(num_experts=4, top_k_experts=2, moe_intermediate_size=8, num_hidden_layers=7)
    # 5:1 pattern, last layer forced to full.
    assert text.layer_types == [S] * 5 + [F, F]
    assert [(s.head_dim, s.num_key_value_heads) for s in text.attention_shapes] == [(256, 4)] * 5 + [(512, 4)] * 2
    config = DiffusionGemmaConfig(text_config=text.to_dict())
    assert config.text_config.attention_shapes == text.attention_shapes
    assert config.canvas_length == 256 and config.vision_config is None


def tiny_text(**changes) -> dict:
    text = {**BASE_TEXT, "num_hidden_layers": 4, "layer_types": [S, F, S, F], "global_head_dim": 32,
            "num_global_key_value_heads": 1, "sliding_window": 12}
    text.update(changes)
    return {k: v for k, v in text.items() if v is not DROP}


DROP = object()


def tiny(text=None, **changes) -> dict:
    data = {"model_type": "diffusion_gemma", "text_config": text if text is not None else tiny_text(),
            "canvas_length": 8}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not DROP}


def test_the_tiny_valid_config_loads():
    assert DiffusionGemmaConfig.from_dict(tiny()).text_config.layer_types == [S, F, S, F]


@pytest.mark.parametrize("data, message", [
    (tiny(model_type="gemma3"), r"unsupported model_type 'gemma3'; this engine runs 'diffusion_gemma'"),
    (tiny(model_type=DROP), r"unsupported model_type None"),
    (tiny(tiny_text(model_type="gemma4_text")), r"unsupported text model_type 'gemma4_text'"),
    (tiny(tiny_text(layer_types=[S, "chunked_attention", S, F])), r"unknown `layer_types` \['chunked_attention'\]"),
    (tiny(tiny_text(layer_types=[S, F, F, S])), r"last entry of `layer_types` must be 'full_attention'"),
    (tiny(tiny_text(layer_types=[S, F, F])), r"`layer_types` has 3 entries but `num_hidden_layers` is 4"),
    (tiny(tiny_text(rope_parameters={S: {"rope_type": "yarn", "rope_theta": 1e4},
                                     F: {"rope_type": "default", "rope_theta": 1e6}})),
     r"unsupported rope_type 'yarn' for sliding_attention"),
    (tiny(tiny_text(rope_parameters={S: {"rope_type": "default", "rope_theta": 1e4}})),
     r"`rope_parameters` has no entry for 'full_attention'"),
    (tiny(tiny_text(use_bidirectional_attention="text")), r"`use_bidirectional_attention` must be one of .*'text'"),
    (tiny(tiny_text(use_bidirectional_attention=True)), r"`use_bidirectional_attention` must be one of .*True"),
    (tiny(tiny_text(top_k_experts=9)), r"`top_k_experts` \(9\) cannot exceed `num_experts` \(8\)"),
    (tiny(tiny_text(num_experts=DROP)), r"`num_experts` must be a positive integer, got None"),
    (tiny(tiny_text(moe_intermediate_size=DROP)), r"`moe_intermediate_size` must be a positive integer, got None"),
    (tiny(tiny_text(num_key_value_heads=3)),
     r"`num_attention_heads` \(4\) must be a multiple of the 3 key/value heads of a sliding_attention layer"),
    (tiny(tiny_text(num_global_key_value_heads=3)),
     r"`num_attention_heads` \(4\) must be a multiple of the 3 key/value heads of a full_attention layer"),
    (tiny(tiny_text(tie_word_embeddings=False)), r"`tie_word_embeddings` must be true"),
    (tiny(tie_word_embeddings=False), r"`tie_word_embeddings` must be true"),
    (tiny(canvas_length=0), r"`canvas_length` must be a positive integer, got 0"),
    (tiny(canvas_length=-4), r"`canvas_length` must be a positive integer, got -4"),
    (tiny(canvas_length=8.0), r"`canvas_length` must be a positive integer, got 8.0"),
    (tiny(vision_config={"model_type": "siglip_vision_model"}),
     r"unsupported vision model_type 'siglip_vision_model'; expected 'gemma4_vision'"),
    (tiny(vision_config=[1, 2]), r"`vision_config` must be a JSON object or null"),
    (tiny(tiny_text(hidden_activation="relu")), r"`hidden_activation` must be one of"),
    (tiny(tiny_text(sliding_window=0)), r"`sliding_window` must be a positive integer, got 0"),
    (tiny(tiny_text(per_layer_config={"7": {"head_dim": 32}})), r"`per_layer_config` names layer 7, but there are 4"),
    (tiny(tiny_text(per_layer_config={"1": {"head_dim": 32, "rope_theta": 1.0}})),
     r"`per_layer_config` for layer 1 overrides unsupported keys \['rope_theta'\]"),
])
def test_invalid_configs_raise_value_error(data, message):
    with pytest.raises(ValueError, match=message):
        DiffusionGemmaConfig.from_dict(data)


def test_bad_json_file_names_the_path(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
        DiffusionGemmaConfig.from_json_file(path)
