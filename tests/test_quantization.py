"""Quantized weights (#20): the schemes' numbers, quantizing as the weights load, quantized checkpoints
(this engine's and compressed-tensors FP8 written here by hand), generating and serving, and the errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import randomize, tiny_model
from safetensors.torch import load_file, save_file

from diffusiongemma import DiffusionGemmaForBlockDiffusion
from diffusiongemma.engine.runner import RequestsRunner
from diffusiongemma.kernels import fused
from diffusiongemma.model.quantization import (
    QuantizedLinear,
    QuantizedWeight,
    dequantize,
    parse_scheme,
    quantizable,
    quantize,
    quantized_bytes,
    replace,
    weight_scheme,
)

SCHEMES = ["int8", "int4", "int4-g16", "fp8"]


def _weights(model) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def _weight_bytes(model) -> int:
    """Bytes of the parameters and of the quantized weights' codes and scales, each tensor once."""
    quantized = [t for m in model.modules() if isinstance(m, QuantizedWeight) for t in (m.weight, m.weight_scale)]
    return sum(t.nbytes for t in [*model.parameters(), *quantized])


def _logits(model, seed=0) -> torch.Tensor:
    """The decoder's logits for a fixed prompt and canvas, after the encoder has read the prompt."""
    generator = torch.Generator().manual_seed(seed)
    vocab, length = model.config.text_config.vocab_size, model.config.canvas_length
    prompt = torch.randint(0, vocab, (2, 7), generator=generator)
    canvas = torch.randint(0, vocab, (2, length), generator=generator)
    with torch.no_grad():
        return model(input_ids=prompt, decoder_input_ids=canvas).logits


def _dequantized_twin(quantized, full):
    """`full` (the unquantized model) with every quantized weight of `quantized` replaced by its dequantized
    values: what the quantized model must compute."""
    twin = DiffusionGemmaForBlockDiffusion(full.config).eval()
    twin.load_state_dict(full.state_dict())
    for (owner, attr), (twin_owner, twin_attr) in zip(quantizable(quantized), quantizable(twin)):
        weight = getattr(owner, attr)
        target = getattr(twin_owner, twin_attr)
        target = target.weight if isinstance(target, torch.nn.Linear) else target
        with torch.no_grad():
            target.copy_(weight.dequantize(target.dtype))
    return twin


@pytest.mark.parametrize("name", SCHEMES)
def test_codes_and_scales_keep_each_weight_within_half_a_step(name):
    """Each dequantized value is within half a quantization step of the weight (fp8: within its relative
    rounding), codes take the scheme's range, and quantizing the dequantized weight gives the same codes."""
    scheme = parse_scheme(name)
    weight = torch.randn(3, 24, 64) * torch.rand(3, 24, 1)
    weight[1, 5] = 0  # an all-zero row must not divide by zero
    codes, scale = quantize(weight, scheme)
    back = dequantize(codes, scale, torch.float32)
    assert back.shape == weight.shape and torch.isfinite(back).all() and (back[1, 5] == 0).all()
    if name == "fp8":
        assert codes.dtype == torch.float8_e4m3fn and scale.shape == (3, 24, 1)
        assert ((back - weight).abs() <= weight.abs() / 16 + scale * 2**-9).all()
    else:
        group = scheme.group_size or 64
        step = scale.float().repeat_interleave(group, dim=-1)
        assert ((back - weight).abs() <= step / 2 + 1e-7).all()
        if name == "int8":
            assert codes.dtype == torch.int8 and codes.abs().max() == 127 and scale.shape == (3, 24, 1)
        else:
            assert codes.dtype == torch.uint8 and codes.shape == (3, 24, 32) and scale.shape == (3, 24, 64 // group)
            nibbles = torch.stack([codes & 15, codes >> 4])
            assert nibbles.min() >= 1 and nibbles.max() == 15  # symmetric: codes -7..7, stored plus 8
    again, again_scale = quantize(back, scheme)
    assert torch.equal(again.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(again_scale, scale)


def test_fp8_linear_computes_with_its_dequantized_weight():
    """The fp8 layer, built here on the CPU (loading refuses fp8 there), multiplies by code times scale."""
    layer = QuantizedLinear(64, 24, bias=True, scheme=parse_scheme("fp8"))
    weight = torch.randn(24, 64)
    with torch.no_grad():
        layer.set(*quantize(weight, layer.scheme))
        layer.bias.normal_()
    x = torch.randn(5, 64)
    expected = x @ dequantize(layer.weight, layer.weight_scale, torch.float32).t() + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert layer.to(torch.bfloat16).weight.dtype == torch.float8_e4m3fn  # a cast keeps codes and scales
    assert layer.weight_scale.dtype == torch.float32


@pytest.fixture(scope="module")
def full(checkpoint):
    return DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def quantized(checkpoint):
    return {name: DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, quantization=name)
            for name in ("int8", "int4")}


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_loaded_model_computes_with_the_rounded_weights(quantized, full, name):
    model = quantized[name]
    replaced = quantizable(model)
    # Attention (3 sliding layers with 4 projections, 1 full with 3), dense MLP and experts of the 4 layers,
    # and the self-conditioning MLP.
    assert len(replaced) == (3 * 4 + 3) + 4 * 3 + 4 * 2 + 3 and all(
        isinstance(getattr(owner, attr), QuantizedWeight) for owner, attr in replaced)
    layer = model.model.backbone.layers[0]
    assert isinstance(layer.router.proj, torch.nn.Linear) and layer.router.proj.weight.dtype == torch.float32
    assert model.model.backbone.embed_tokens.weight.dtype == torch.float32
    expected = _logits(_dequantized_twin(model, full))
    logits = _logits(model)
    assert torch.allclose(logits, expected, atol=1e-4), (logits - expected).abs().max()
    # The rounding shows: the quantized model is not the full-precision one.
    assert not torch.allclose(logits, _logits(full), atol=1e-4)


def test_weight_bytes_are_what_the_scheme_says(quantized, full):
    with torch.device("meta"):
        shapes = DiffusionGemmaForBlockDiffusion(full.config)
    assert _weight_bytes(full) == quantized_bytes(shapes, None, torch.float32)
    for name, model in quantized.items():
        assert _weight_bytes(model) == quantized_bytes(shapes, parse_scheme(name), torch.float32)
    assert _weight_bytes(quantized["int4"]) < _weight_bytes(quantized["int8"]) < _weight_bytes(full)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_save_pretrained_loads_back_the_same_numbers(quantized, tmp_path, name):
    model = quantized[name]
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == ("compressed-tensors" if name == "int8" else "diffusiongemma")
    stored = load_file(tmp_path / "model.safetensors")
    codes = "model.decoder.layers.0.experts.gate_up_proj"
    assert stored[codes].dtype == (torch.int8 if name == "int8" else torch.uint8)
    assert codes + "_scale" in stored and "model.decoder.layers.0.self_attn.q_proj.weight_scale" in stored
    assert "model.decoder.layers.0.router.proj.weight_scale" not in stored
    # int4 keeps the attention's value path in int8: v_proj, o_proj, and k_proj where a layer has no v_proj.
    full_layer = "model.decoder.layers.3.self_attn."
    assert [stored[full_layer + p + ".weight"].dtype for p in ("q_proj", "k_proj", "o_proj")] == (
        [torch.int8] * 3 if name == "int8" else [torch.uint8, torch.int8, torch.int8])
    assert stored["model.decoder.layers.0.self_attn.k_proj.weight"].dtype == stored[codes].dtype
    again = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path)
    before, after = _weights(model), _weights(again)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_logits(again), _logits(model))
    # Asking again for the scheme the checkpoint holds is no error; another scheme is.
    DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path, quantization=str(model.model.backbone.layers[0]
                                                                                 .experts.down_proj.scheme))
    with pytest.raises(ValueError, match="holds .* weights; load it with quantization="):
        DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path, quantization="int8" if name == "int4" else "int4")


def _compressed_tensors_fp8(full, folder, per_tensor: set[str]):
    """A compressed-tensors FP8 checkpoint of `full`, written from the format's description: every quantized
    Linear's weight in F8_E4M3 with a float32 `weight_scale` per output channel ([out, 1]), or one per tensor
    for the names in `per_tensor`; the router and the vision tower left out (the `ignore` list)."""
    full.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    for name in list(tensors):
        quantized = ((".self_attn." in name or ".mlp." in name or ".experts." in name
                      or "self_conditioning." in name and "norm" not in name) and "vision" not in name)
        if not quantized or "norm" in name:
            continue
        weight = tensors[name].float()
        if name in per_tensor:
            scale = weight.abs().amax().reshape(1) / 448
        else:
            scale = weight.abs().amax(dim=-1, keepdim=True) / 448
        tensors[name] = (weight / scale).to(torch.float8_e4m3fn)
        tensors[name + "_scale"] = scale
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                                  "dynamic": True}}},
        "ignore": ["lm_head", "re:.*router.*", "re:.*vision.*"]}
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


def test_compressed_tensors_fp8_checkpoint_dequantizes_on_the_cpu(full, tmp_path):
    per_tensor = {"model.decoder.layers.1.self_attn.q_proj.weight"}
    tensors = _compressed_tensors_fp8(full, tmp_path, per_tensor)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path)
    assert not any(isinstance(m, QuantizedWeight) for m in model.modules())
    layers = model.model.backbone.layers
    for name, weight in (("model.decoder.layers.1.self_attn.q_proj.weight", layers[1].self_attn.q_proj.weight),
                         ("model.decoder.layers.0.experts.down_proj", layers[0].experts.down_proj)):
        expected = tensors[name].float() * tensors[name + "_scale"]
        assert weight.dtype == torch.float32 and torch.equal(weight, expected)
    assert torch.equal(layers[0].router.proj.weight, full.model.backbone.layers[0].router.proj.weight)
    assert not torch.equal(_logits(model), _logits(full))
    with pytest.raises(ValueError, match="fp8 weights need a CUDA GPU of compute capability 8.9"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path, quantization="fp8")
    # Saved again, the model is full precision, with no quantization_config.
    model.save_pretrained(tmp_path / "again")
    assert "quantization_config" not in json.loads((tmp_path / "again" / "config.json").read_text())


def test_quantized_model_generates_and_its_batched_pass_equals_each_row_alone(quantized, tiny):
    """What the server relies on (`batch_invariant`): every row of a batched decoder pass gets the bits it
    gets alone, with quantized weights too; `generate` with batch_invariant=True runs."""
    model = quantized["int4"]
    _, processor = tiny
    runner = RequestsRunner(model, soft_capped=True)
    generator = torch.Generator().manual_seed(0)
    vocab, length = model.config.text_config.vocab_size, model.config.canvas_length
    with torch.inference_mode():
        caches, canvases = [], []
        for prefix in (3, 40, 9):
            caches.append(runner.new_cache())
            runner.encode(caches[-1], torch.randint(0, vocab, (1, prefix), generator=generator))
            canvases.append(torch.randint(0, vocab, (1, length), generator=generator))
        alone = [runner.decode([cache], canvas, [None]) for cache, canvas in zip(caches, canvases)]
        together = runner.decode(caches, torch.cat(canvases), [None] * 3)
        for row, scores in enumerate(alone):
            assert torch.equal(together.rows(row, row + 1), scores.rows(0, 1)), f"row {row}"
    ids = processor.tokenizer.encode("quantized")
    torch.manual_seed(1)
    out = model.generate(torch.tensor([ids]), max_new_tokens=16, max_denoising_steps=3, batch_invariant=True)
    assert out.sequences.shape[1] > len(ids)


def test_quantized_model_serves(quantized, tiny):
    from fastapi.testclient import TestClient

    from diffusiongemma.serving.server import create_app

    _, processor = tiny
    app = create_app(quantized["int8"], processor, "q", max_batch=2, max_queue=4)
    with TestClient(app) as client:
        answer = client.post("/v1/completions", json={"model": "q", "prompt": "hello", "max_tokens": 8, "seed": 3,
                                                      "max_denoising_steps": 3})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] > 0


def test_bad_choices_fail_with_one_clear_line(checkpoint):
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, quantization="int3")
    with pytest.raises(ValueError, match="int4 groups of 48 do not divide"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, quantization="int4-g48")
    with pytest.raises(ValueError, match="fp8 weights need a CUDA GPU .* not the CPU"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, quantization="fp8")
    with pytest.raises(ValueError, match="LoRA adapter cannot be folded into quantized weights"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, quantization="int8", adapter=checkpoint)
    sharded = []
    with pytest.raises(ValueError, match="quantized weights cannot be sharded"):
        DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, quantization="int8", sharding=sharded.append)
    assert not sharded


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "diffusiongemma", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_every_command_that_loads_a_model_takes_quantization(checkpoint):
    from diffusiongemma.cli.main import build_parser

    for command in (["generate", checkpoint, "hi"], ["chat", checkpoint], ["serve", checkpoint]):
        assert build_parser().parse_args([*command, "--quantization", "int4-g64"]).quantization == "int4-g64"


def test_cli_quantization_flags_and_info(checkpoint, full):
    done = _cli("generate", checkpoint, "hi", "--quantization", "int4", "--max-new-tokens", "8",
                "--max-denoising-steps", "2", "--seed", "0")
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    for flag, message in (("fp8", "fp8 weights need a CUDA GPU"), ("int4-g48", "int4 groups of 48 do not divide"),
                          ("nf4", "unknown quantization 'nf4'")):
        failed = _cli("generate", checkpoint, "hi", "--quantization", flag)
        assert failed.returncode == 1 and message in failed.stderr and len(failed.stderr.splitlines()) == 1
    facts = json.loads(_cli("info", checkpoint, "--json", "--dtype", "float32").stdout)
    sizes = facts["quantized_weights"]
    assert set(sizes) == {"int8", "int4-g32", "fp8"} and sizes["int8"] == sizes["fp8"]
    assert sizes["int4-g32"] < sizes["int8"] < facts["weights"]["bytes"]
    loaded = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, quantization="int8")
    assert sizes["int8"] == _weight_bytes(loaded)


@pytest.mark.parametrize("name", ["int8", "int4", "int4-g16", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_reads_codes_and_scales(name, dtype):
    """The CUDA kernel of the experts' products (Triton's interpreter runs it here) reads the codes and scales
    and gives the products with the dequantized weights: experts with no rows, with more than a block, 96
    inputs (int4-g16: groups of 16, a block of inputs per group)."""
    counts = (3, 0, fused._ROWS + 5, 4)
    source = torch.Generator().manual_seed(1)
    x = torch.randn(sum(counts), 96, generator=source).to(dtype)
    codes, scale = quantize(torch.randn(len(counts), 80, 96, generator=source), parse_scheme(name))
    assert fused.reads_codes(codes, scale)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    out = fused.grouped_linear(x, codes, ends, scale)
    weight = dequantize(codes, scale, torch.float32)
    expected = torch.cat([rows.float() @ weight[expert].t() for expert, rows in enumerate(x.split(list(counts)))])
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected, rtol=1e-5 if dtype == torch.float32 else 2 ** -7, atol=1e-4)


def test_fused_kernel_leaves_scales_it_cannot_read_to_dequantizing():
    codes = torch.zeros(2, 8, 32, dtype=torch.float8_e4m3fn)
    assert not fused.reads_codes(codes, torch.ones(1))  # one scale per tensor, from an fp8 checkpoint
    assert not fused.reads_codes(codes, torch.ones(2, 2, 2))  # per block of 4 x 16
    assert not fused.reads_codes(torch.zeros(2, 8, 16, dtype=torch.uint8), torch.ones(2, 8, 4))  # groups of 8


@pytest.mark.parametrize("name", ["int8", "int4-g16"])  # the tiny model's dense MLP has 48 inputs
def test_a_quantized_model_takes_the_fused_kernel_for_every_quantized_product(monkeypatch, name):
    """Where the fused kernels run (CUDA; the interpreter here), every quantized product, projections and
    experts, reads the codes in the kernel, and the logits are those of the dequantizing path."""
    full = randomize(tiny_model())
    model = tiny_model()
    model.load_state_dict(full.state_dict())
    for owner, attr in quantizable(model):
        weight = getattr(owner, attr)
        weight = weight.weight if isinstance(weight, torch.nn.Linear) else weight
        scheme = weight_scheme(owner, attr, parse_scheme(name))
        codes, scale = quantize(weight.detach(), scheme)
        replace(owner, attr, scheme)
        getattr(owner, attr).set(codes, scale)
    prompt, canvas = torch.tensor([[3, 4, 5, 6]]), torch.tensor([[7, 8, 9, 10]])
    signal = 4 * torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=signal).logits
    calls, grouped_linear = [], fused.grouped_linear
    monkeypatch.setattr(fused, "usable", lambda device: True)
    monkeypatch.setattr(fused, "grouped_linear", lambda *args: calls.append(len(args)) or grouped_linear(*args))
    with torch.no_grad():
        logits = model(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=signal).logits
    # Every quantized product with its scales, once in the encoder's pass and once in the decoder's, but the
    # self-conditioning MLP's three, which only the decoder runs.
    assert calls == [4] * (2 * len(quantizable(model)) - 3)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
