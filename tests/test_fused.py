"""The fused CUDA kernels (`fused.py`), run by Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1). The sampler: the unfused step's values, random stream and tokens, and `generate` and
`serve` with it in place of the unfused step. The RMS norm and the experts' grouped products: the composites'
values, and a model's logits. And every launch compiled for a GPU (sm90), which the interpreter never does."""

import json
import os
import queue
import subprocess
import sys

import pytest
import torch
import triton
from conftest import randomize, served_texts, tiny_model

from diffusiongemma import AutoProcessor, DiffusionGemmaForBlockDiffusion
from diffusiongemma.engine.sampler import sample_tokens, token_entropy
from diffusiongemma.hf.presets import write_random_checkpoint
from diffusiongemma.kernels import fused
from diffusiongemma.model import layers
from diffusiongemma.model.cache import KVCache
from diffusiongemma.serving import scheduler as engine

# Crosses a block boundary of the kernel twice, with a partial last block.
WIDE = 2 * fused._BLOCK + 37


def rounded_to(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Which entries of `values` a tensor in `dtype` may hold: bfloat16 rounds to nearest on a GPU and
    truncates in Triton's interpreter."""
    nearest = values.to(dtype)
    if dtype != torch.bfloat16:
        return nearest[None]
    truncated = (values.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    return torch.stack([nearest, truncated])


@pytest.mark.parametrize("vocab", [7, 384, WIDE])
@pytest.mark.parametrize("temperature", [None, 0.55])
@pytest.mark.parametrize("dtype, cap", [(torch.float32, None), (torch.bfloat16, 5.0)])
def test_values_and_random_stream_are_the_unfused_steps(vocab, temperature, dtype, cap):
    """Scores in the model's dtype, soft-capped or not, as the model's logits are."""
    source = torch.Generator().manual_seed(vocab)
    scores = torch.randn(3, 5, vocab, generator=source) * 4
    # The maximum in the last block, past the earlier blocks' maxima.
    scores[0, 0, -3] = 40.0
    scores = scores.to(dtype)
    t = None if temperature is None else torch.tensor(temperature)
    logits = scores.float() if cap is None else torch.tanh(scores.float() / cap) * cap
    processed = logits if t is None else logits / t
    for sampling in fused.SAMPLINGS:
        ours, theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        out = torch.empty(scores.shape, dtype=dtype)
        tokens, argmax, entropy = fused.denoise(scores, cap, t, sampling, ours, out)
        expected = sample_tokens(torch.softmax(processed, dim=-1), sampling, theirs)
        assert torch.equal(tokens, expected), sampling
        assert torch.equal(ours.get_state(), theirs.get_state()), sampling
        assert torch.equal(argmax, processed.argmax(dim=-1))
        torch.testing.assert_close(entropy, token_entropy(processed), rtol=1e-5, atol=1e-5)
        assert out.dtype == dtype and out.shape == scores.shape
        if cap is None:
            assert (out[None] == rounded_to(processed, dtype)).any(dim=0).all()
        else:
            # The kernel's tanh is within a few ulps of torch's; then one rounding to bfloat16.
            torch.testing.assert_close(out.float(), processed, rtol=2 ** -7, atol=0)


def test_soft_capping_is_within_a_few_ulps_of_tanh():
    values = torch.cat([torch.linspace(-20, 20, 8001), torch.logspace(-30, 0, 2001), -torch.logspace(-30, 0, 2001),
                        torch.tensor([0.0, 0.29999, 0.3, 0.30001])])
    out = torch.empty(1, values.shape[0])
    fused.denoise(values[None], 1.0, None, "argmax", None, out)
    exact = torch.tanh(values.double())
    assert torch.equal(out[0] == 0, values == 0)
    assert ((out[0].double() - exact).abs() <= 3 * torch.finfo(torch.float32).eps * exact.abs()).all()


def test_ties_go_to_the_first_position():
    logits = torch.zeros(2, 1, WIDE)
    logits[:, :, [5, fused._BLOCK + 5, WIDE - 1]] = 3.0
    tokens, argmax, _ = fused.denoise(logits, None, None, "argmax", None, torch.empty(logits.shape))
    assert argmax.flatten().tolist() == [5, 5] and tokens.flatten().tolist() == [5, 5]


def test_kept_rows_keep_what_the_output_holds():
    scores = torch.randn(3, 2, 50, generator=torch.Generator().manual_seed(2))
    into = torch.full(scores.shape, 7.0)
    kept = torch.tensor([True, False, True])[:, None]
    tokens, _, _ = fused.denoise(scores, None, None, "multinomial", torch.Generator().manual_seed(3), into, kept)
    expected, _, _ = fused.denoise(scores, None, None, "multinomial", torch.Generator().manual_seed(3),
                                   torch.empty(scores.shape))
    assert torch.equal(tokens, expected)  # kept rows are still sampled, from the same random stream
    assert (into[[0, 2]] == 7.0).all() and torch.equal(into[1], scores[1])


@pytest.mark.parametrize("sampling", ["multinomial", "inverse_cdf"])
def test_samples_follow_the_distribution(monkeypatch, sampling):
    """Chi-square goodness of fit on a known distribution spread over three blocks, with zero-probability
    tokens never drawn. Small blocks and few rows keep the interpreter quick."""
    monkeypatch.setattr(fused, "_BLOCK", 64)
    vocab = 2 * 64 + 37
    probs = torch.zeros(vocab)
    where = [0, 17, 64, 65, vocab - 1]
    probs[where] = torch.tensor([0.4, 0.25, 0.15, 0.12, 0.08])
    rows = 300
    tokens, _, _ = fused.denoise(probs.log().expand(rows, vocab), None, None, sampling,
                                 torch.Generator().manual_seed(0), torch.empty(rows, vocab))
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts.sum() == rows and counts[probs == 0].sum() == 0
    expected = rows * probs.double()[where]
    chi_square = ((counts[where] - expected) ** 2 / expected).sum()
    assert chi_square < 18.5  # the 99.9th percentile of chi-square with 4 degrees of freedom


def use_fused_kernels_on_cpu(monkeypatch):
    """Counts the sampler kernel's calls, with the model, `generate` and `serve` taking the fused kernels on
    the CPU as they do on CUDA."""
    calls = []
    denoise = fused.denoise

    def counted(*args, **kwargs):
        calls.append(args[3])
        return denoise(*args, **kwargs)

    monkeypatch.setattr(fused, "usable", lambda device: True)
    monkeypatch.setattr(fused, "denoise", counted)
    return calls


@pytest.mark.parametrize("settings", [{}, {"fast_sampling": True}, {"t_min": None, "t_max": None},
                                      {"confidence_threshold": None}])
def test_generate_with_the_fused_kernels_gives_the_unfused_tokens(monkeypatch, settings):
    """Last-bit differences could change a token in principle; on these seeds none does, in any setting."""
    model = tiny_model()
    prompt = torch.tensor([[3, 4, 5], [6, 7, 8]])
    settings = dict(max_new_tokens=8, max_denoising_steps=5, **settings)
    torch.manual_seed(0)
    unfused = model.generate(prompt, **settings)
    calls = use_fused_kernels_on_cpu(monkeypatch)
    torch.manual_seed(0)
    with_kernels = model.generate(prompt, **settings)
    assert calls and set(calls) == {"inverse_cdf" if settings.get("fast_sampling") else "multinomial"}
    assert torch.equal(with_kernels.sequences, unfused.sequences)
    assert torch.equal(with_kernels.tokens_per_forward, unfused.tokens_per_forward)
    # The same random stream: the global generator ends where the unfused run left it.
    after = torch.rand(4)
    torch.manual_seed(0)
    model.generate(prompt, fused_sampler=False, **settings)
    assert torch.equal(torch.rand(4), after)


def test_the_fused_sampler_gives_way_to_a_logits_processor_and_to_the_switch(monkeypatch):
    model = tiny_model()
    calls = use_fused_kernels_on_cpu(monkeypatch)
    seen = []

    def processor(input_ids, scores):
        seen.append(scores.shape)
        return scores

    model.generate(torch.tensor([[3, 4]]), max_new_tokens=4, max_denoising_steps=3, logits_processor=[processor])
    assert len(seen) == 3 and not calls
    model.generate(torch.tensor([[3, 4]]), max_new_tokens=4, max_denoising_steps=3, fused_sampler=False)
    assert not calls
    with pytest.raises(ValueError, match="fused_sampler"):
        model.generate(torch.tensor([[3, 4]]), fused_sampler="no")
    assert "fused_sampler" not in model.generation_config.to_dict()


def served_together(model, tokenizer, requests: list[tuple[list[int], float, int]]) -> list[str]:
    """The answers to (prompt, temperature, seed) requests submitted at once, so that they share steps."""
    scheduler = engine.Scheduler(model, tokenizer, max_batch=len(requests), max_queue=len(requests))
    outcomes = [queue.Queue() for _ in requests]
    for (prompt, temperature, seed), events in zip(requests, outcomes):
        settings = engine.resolve_settings(model, len(prompt), max_tokens=12, temperature=temperature, seed=seed,
                                           max_denoising_steps=4)
        scheduler.submit(engine.Request(prompt, settings, events.put))
    scheduler.start()
    try:
        return served_texts(outcomes)
    finally:
        scheduler.stop()


def served(model, tokenizer, prompt: list[int], temperature: float) -> str:
    return served_together(model, tokenizer, [(prompt, temperature, 5)])[0]


def test_serve_with_the_fused_kernels_gives_the_unfused_answers(monkeypatch, tmp_path):
    """A seeded request, and one at temperature 0 (the kernel's argmax)."""
    write_random_checkpoint(tmp_path, "tiny", seed=0)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path).eval()
    tokenizer = AutoProcessor.from_pretrained(tmp_path).tokenizer
    prompt = tokenizer.encode("a fused question")
    unfused = [served(model, tokenizer, prompt, temperature) for temperature in (1.0, 0.0)]
    calls = use_fused_kernels_on_cpu(monkeypatch)
    assert [served(model, tokenizer, prompt, temperature) for temperature in (1.0, 0.0)] == unfused
    assert set(calls) == {"multinomial", "argmax"}


def test_served_requests_side_by_side_keep_their_own_temperature_and_random_stream(monkeypatch, tmp_path):
    """One step samples every request's rows in one kernel call, each row at its own temperature and with
    its own generator's variates: each answer is the one it gets alone."""
    write_random_checkpoint(tmp_path, "tiny", seed=0)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path).eval()
    tokenizer = AutoProcessor.from_pretrained(tmp_path).tokenizer
    calls = use_fused_kernels_on_cpu(monkeypatch)
    requests = [(tokenizer.encode("a fused question"), 1.0, 5), (tokenizer.encode("another, longer question"), 0.3, 6),
                (tokenizer.encode("a third"), 1.7, 7)]
    alone = [served_together(model, tokenizer, [request])[0] for request in requests]
    calls.clear()
    assert served_together(model, tokenizer, requests) == alone
    assert len(set(alone)) == 3
    # Fewer kernel calls than request steps: the requests shared them.
    assert 0 < len(calls) < 3 * 4 * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_gives_torchs_values(dtype):
    """Rows across block boundaries, with -inf entries, in the model's dtype in and out."""
    x = (torch.randn(2, 3, WIDE, generator=torch.Generator().manual_seed(4)) * 6).to(dtype)
    x[0, 1, [3, fused._BLOCK + 1, WIDE - 1]] = float("-inf")
    expected = x.softmax(dim=-1, dtype=torch.float32)
    out = fused.softmax(x, dtype)
    assert out.dtype == dtype and out.shape == x.shape and (out[0, 1, [3, fused._BLOCK + 1, WIDE - 1]] == 0).all()
    torch.testing.assert_close(out.float(), expected, rtol=1e-5 if dtype == torch.float32 else 2 ** -7, atol=1e-9)


@pytest.mark.parametrize("shape, dtype, with_weight", [((3, 5, 64), torch.float32, True),
                                                       ((2, 4, 3, 37), torch.bfloat16, False),
                                                       ((6, 176), torch.bfloat16, True)])
def test_rms_norm_gives_the_composites_values(shape, dtype, with_weight):
    source = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=source) * 3).to(dtype)
    weight = (1 + 0.2 * torch.randn(shape[-1], generator=source)).to(dtype) if with_weight else None
    expected = layers.rms_norm(x, weight, 1e-6)
    out = fused.rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert fused.rms_norm(x[:0], weight, 1e-6).shape == x[:0].shape  # no rows: an empty grid
    # bfloat16: one rounding, to nearest on a GPU and by truncation in the interpreter.
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-6 if dtype == torch.float32 else 2 ** -7,
                               atol=0)


@pytest.mark.parametrize("counts, dtype", [
    # An expert with more rows than a block (two blocks), experts with none, 100 columns (two blocks) and 70
    # inputs (two blocks, the second partial).
    ((0, 0, 5, 0, fused._ROWS + 6, 1, 0, 2), torch.float32),
    ((3, 0, 17, 4), torch.bfloat16),
    ((0, 0, 0), torch.float32),
])
def test_grouped_linear_gives_each_experts_product(counts, dtype):
    source = torch.Generator().manual_seed(len(counts))
    x = torch.randn(sum(counts), 70, generator=source).to(dtype)
    weight = torch.randn(len(counts), 100, 70, generator=source).to(dtype)
    # A view one past a value that is not zero: the first expert's rows start at 0, whatever comes before.
    ends = torch.cat([torch.tensor([7]), torch.tensor(counts).cumsum(0)]).to(torch.int32)[1:]
    out = fused.grouped_linear(x, weight, ends)
    expected = torch.cat([rows.float() @ weight[expert].float().t()
                          for expert, rows in enumerate(x.split(list(counts)))])
    assert out.dtype == dtype and out.shape == (sum(counts), 100)
    # bfloat16: one rounding of a float32 sum, to nearest on a GPU and by truncation in the interpreter.
    torch.testing.assert_close(out.float(), expected, rtol=1e-5 if dtype == torch.float32 else 2 ** -7,
                               atol=1e-5)


def test_a_model_takes_the_fused_kernels_where_autograd_records_nothing(monkeypatch):
    """The norms, the experts' products and the self-conditioning input's softmax."""
    model = randomize(tiny_model())
    prompt, canvas = torch.tensor([[3, 4, 5, 6]]), torch.tensor([[7, 8, 9, 10]])
    signal = 4 * torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=signal).logits
    calls, norm, softmax, grouped_linear = [], fused.rms_norm, fused.softmax, fused.grouped_linear
    monkeypatch.setattr(fused, "usable", lambda device: True)
    monkeypatch.setattr(fused, "rms_norm", lambda *args: calls.append("norm") or norm(*args))
    monkeypatch.setattr(fused, "softmax", lambda *args: calls.append("softmax") or softmax(*args))
    monkeypatch.setattr(fused, "grouped_linear", lambda *args: calls.append("experts") or grouped_linear(*args))
    with torch.no_grad():
        logits = model(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=signal).logits
    assert set(calls) == {"norm", "softmax", "experts"}
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # Training: autograd records the composites, and gradients reach the norms' weights and the logits.
    calls.clear()
    signal.requires_grad_(True)
    model(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=signal).logits.sum().backward()
    layer = model.model.backbone.layers[0]
    assert not calls and layer.input_layernorm.weight.grad is not None and layer.experts.down_proj.grad is not None
    assert signal.grad is not None


def test_requests_side_by_side_share_the_fused_experts_and_get_their_numbers_alone(monkeypatch):
    """The scheduler's pass (one cache per row): with the fused kernel the experts run once per layer for
    every row, and each row still gets what its pass alone gives."""
    model = randomize(tiny_model(num_experts=8))
    config, source = model.config, torch.Generator().manual_seed(6)
    vocab, length = config.text_config.vocab_size, config.canvas_length
    caches, canvases, signals, positions = [], [], [], []
    with torch.no_grad():
        for prefix in (3, 9, 5):
            caches.append(KVCache(config.text_config, length))
            model.model.encoder(input_ids=torch.randint(0, vocab, (1, prefix), generator=source),
                                past_key_values=caches[-1])
            canvases.append(torch.randint(0, vocab, (1, length), generator=source))
            signals.append(None if prefix == 9 else 4 * torch.randn(1, length, vocab, generator=source))
            positions.append(torch.arange(prefix, prefix + length, dtype=torch.int32)[None])
    calls, grouped_linear = [], fused.grouped_linear
    monkeypatch.setattr(fused, "usable", lambda device: True)
    monkeypatch.setattr(fused, "grouped_linear", lambda *args: calls.append(args[0].shape[0]) or grouped_linear(*args))
    with torch.no_grad():
        alone = [model.model.decoder(decoder_input_ids=canvas, past_key_values=[cache], self_conditioning_logits=[signal],
                                     decoder_position_ids=position).last_hidden_state
                 for cache, canvas, signal, position in zip(caches, canvases, signals, positions)]
        calls.clear()
        together = model.model.decoder(decoder_input_ids=torch.cat(canvases), past_key_values=caches,
                                       self_conditioning_logits=signals,
                                       decoder_position_ids=torch.cat(positions)).last_hidden_state
    top_k = config.text_config.top_k_experts
    # Two products (gate and up, then down) per layer, each over every row's routed tokens.
    assert calls == [len(caches) * length * top_k] * (2 * config.text_config.num_hidden_layers)
    for row, hidden in enumerate(alone):
        assert torch.equal(together[row:row + 1], hidden), f"row {row} differs from its pass alone"


# How a launch's arguments look to Triton's compiler.
POINTERS = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.int32: "*i32", torch.int64: "*i64",
            torch.int8: "*i8", torch.uint8: "*u8", torch.float8_e4m3fn: "*fp8e4nv"}


def launches(monkeypatch, calls) -> list:
    """(kernel's name, signature, constexprs) of each kernel launch the `calls` make, recorded instead of run."""
    from diffusiongemma.kernels import triton_kernels

    made = []

    class Recorder:
        def __init__(self, kernel):
            self.params = triton.JITFunction(kernel.fn).params
            self.name = kernel.fn.__name__

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                given = dict(zip([p.name for p in self.params], args)) | kwargs
                signature, constexprs = {}, {}
                for param in self.params:
                    value = given[param.name]
                    if param.is_constexpr:
                        constexprs[param.name] = value
                        signature[param.name] = "constexpr"
                    else:
                        signature[param.name] = (POINTERS[value.dtype] if isinstance(value, torch.Tensor) else
                                                 "fp32" if isinstance(value, float) else "i32")
                made.append((self.name, signature, constexprs))
            return launch

    for name in ("denoise_kernel", "rms_norm_kernel", "softmax_kernel", "grouped_linear_kernel"):
        monkeypatch.setattr(triton_kernels, name, Recorder(getattr(triton_kernels, name)))
    # The launch a GPU gets: bfloat16 products (the interpreter's stand-in multiplies in float32).
    monkeypatch.setattr(fused, "_interpreted", lambda: False)
    for call in calls:
        call()
    return made


def bf16(*shape):
    return torch.randn(*shape).to(torch.bfloat16)


LAUNCHES = [
    lambda: fused.denoise(bf16(2, 3, 1000), 30.0, torch.tensor(0.7), "multinomial", None, bf16(2, 3, 1000),
                          torch.tensor([[True], [False]])),
    lambda: fused.denoise(bf16(2, 3, 1000), None, None, "inverse_cdf", None, bf16(2, 3, 1000)),
    lambda: fused.denoise(bf16(2, 3, 1000), 30.0, None, "argmax", None, bf16(2, 3, 1000)),
    lambda: fused.rms_norm(bf16(4, 256), bf16(256), 1e-6),
    lambda: fused.rms_norm(bf16(4, 2, 128), None, 1e-6),
    lambda: fused.softmax(bf16(3, 1000), torch.bfloat16),
    lambda: fused.grouped_linear(bf16(24, 256), bf16(8, 192, 256),
                                 torch.tensor([3, 3, 9, 9, 12, 20, 24, 24], dtype=torch.int32)),
    # Quantized weights (`kernels.quantized`): int8 and e4m3 codes with a scale per channel, int4 pairs with
    # a bfloat16 scale per 32 inputs.
    lambda: fused.grouped_linear(bf16(24, 256), torch.zeros(8, 192, 256, dtype=torch.int8),
                                 torch.tensor([3, 3, 9, 9, 12, 20, 24, 24], dtype=torch.int32), torch.ones(8, 192, 1)),
    lambda: fused.grouped_linear(bf16(24, 256), torch.zeros(8, 192, 256).to(torch.float8_e4m3fn),
                                 torch.tensor([3, 3, 9, 9, 12, 20, 24, 24], dtype=torch.int32), torch.ones(8, 192, 1)),
    lambda: fused.grouped_linear(bf16(24, 256), torch.zeros(8, 192, 128, dtype=torch.uint8),
                                 torch.tensor([3, 3, 9, 9, 12, 20, 24, 24], dtype=torch.int32), bf16(8, 192, 8)),
]

# Run without the interpreter, which turns even triton.language's own helpers into Python.
COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from diffusiongemma.kernels import triton_kernels
for name, signature, constexprs in json.load(sys.stdin):
    source = ASTSource(fn=getattr(triton_kernels, name), signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    print(name, bool(compiled.asm["cubin"]), "wgmma" in compiled.asm["ptx"])
"""


def test_the_kernels_compile_for_hopper_gpus_as_launched(monkeypatch, tmp_path):
    """Triton's interpreter runs a kernel as Python: what a GPU's compiler refuses (a shape, a type, an
    operation it lacks) shows only when compiled. Each launch `fused.py` makes is compiled here for sm90,
    the H100 and H200, as it would be on first use there; compiling needs no GPU."""
    made = launches(monkeypatch, LAUNCHES)
    assert {name for name, _, _ in made} == {"denoise_kernel", "rms_norm_kernel", "softmax_kernel",
                                              "grouped_linear_kernel"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(made), env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = [line.split() for line in result.stdout.splitlines()]
    assert [(name, cubin) for name, cubin, _ in compiled] == [(name, "True") for name, _, _ in made]
    # The experts' products run on the tensor cores, in Hopper's warp-group instructions.
    assert all(wgmma == "True" for name, _, wgmma in compiled if name == "grouped_linear_kernel")
