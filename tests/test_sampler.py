"""The sampler, the stopping criteria, the temperature schedule, the generation settings and
`tokens_per_forward`, against hand-computed expectations."""

import math
import os
import time

import pytest
import torch
from conftest import tiny_model

from diffusiongemma import (
    DiffusionGemmaGenerationConfig,
    DiffusionGemmaTextConfig,
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    KVCache,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)
from diffusiongemma.engine.generate import generation_settings
from diffusiongemma.engine.sampler import token_entropy
from diffusiongemma.model.cache import encoder_mask


def test_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0], [0.0, -float("inf")], [math.log(3.0), 0.0]])
    expected = torch.tensor([math.log(2), 0.0, -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))])
    assert torch.allclose(token_entropy(logits), expected, atol=1e-6)
    random_logits = torch.randn(3, 7, 50)
    assert torch.equal(token_entropy(random_logits),
                       torch.distributions.Categorical(logits=random_logits).entropy())


def test_entropy_bound_acceptance_by_hand():
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=0.1), canvas_length=4, vocab_size=10)
    entropy = torch.tensor([[0.05, 0.30, 0.01, 0.07]])
    # Sorted: 0.01, 0.05, 0.07, 0.30; entropy summed before each: 0, 0.01, 0.06, 0.13 -> the first three.
    current, denoised = torch.tensor([[1, 1, 1, 1]]), torch.tensor([[2, 3, 4, 5]])
    accepted = sampler.accept_canvas(current, denoised, torch.zeros(1, 4, 10), entropy=entropy)
    assert accepted.tolist() == [[2, 1, 4, 5]]
    assert sampler.accepted_token_mask.tolist() == [[True, False, True, True]]
    # However high its entropy, the lowest-entropy position is accepted.
    accepted = sampler.accept_canvas(current, denoised, torch.zeros(1, 4, 10), entropy=torch.tensor([[9., 8., 7., 6.]]))
    assert accepted.tolist() == [[1, 1, 1, 5]]


def test_acceptance_from_logits_and_renoising():
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=0.5), canvas_length=3, vocab_size=1000)
    logits = torch.full((1, 3, 1000), -30.0)
    logits[0, 0, 7] = 30.0  # certain
    logits[0, 2] = 0.0  # uniform: entropy log(1000)
    logits[0, 1, :2] = 30.0  # two-way tie: entropy log(2)
    accepted = sampler.accept_canvas(torch.tensor([[0, 0, 0]]), torch.tensor([[7, 1, 9]]), logits)
    assert accepted.tolist() == [[7, 1, 0]]  # 0 + log 2 > 0.5 stops before the uniform position
    torch.manual_seed(3)
    renoised = sampler.renoise_canvas(accepted)
    torch.manual_seed(3)
    noise = torch.randint(0, 1000, (1, 3))
    assert renoised.tolist() == [[7, 1, int(noise[0, 2])]]


def test_sampler_config_validation_and_round_trip():
    config = EntropyBoundSamplerConfig(entropy_bound=0.25)
    assert config.to_dict() == {"entropy_bound": 0.25, "_cls_name": "EntropyBoundSamplerConfig"}
    for bad in (0, -1.0, "0.1", True):
        with pytest.raises(ValueError, match="entropy_bound"):
            EntropyBoundSamplerConfig(entropy_bound=bad)


def test_temperature_schedule_by_hand():
    schedule = LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=4)
    scores = torch.ones(1, 2, 3)
    for step, temperature in zip((4, 3, 2, 1), (0.8, 0.7, 0.6, 0.5)):
        out = schedule(None, scores, cur_step=torch.tensor(step, dtype=torch.int32))
        assert out.dtype == torch.float32
        assert torch.allclose(out, scores / temperature)


def test_stable_and_confident_by_hand():
    stop = StableAndConfidentStoppingCriteria(stability_threshold=2, confidence_threshold=0.1)
    certain = torch.full((2, 3, 5), -50.0)
    certain[..., 0] = 50.0
    unsure = torch.zeros(2, 3, 5)
    canvas = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert stop(canvas, certain).tolist() == [False, False]  # no history yet
    assert stop(canvas, certain).tolist() == [False, False]  # one step of history
    changed = canvas.clone()
    changed[1, 0] = 9
    assert stop(changed, certain).tolist() == [True, False]  # row 0 stable for two steps; row 1 changed
    assert stop(changed, unsure).tolist() == [False, False]  # stable, but not confident
    stop.reset()
    assert stop(changed, certain).tolist() == [False, False]
    always_stable = StableAndConfidentStoppingCriteria(stability_threshold=0, confidence_threshold=0.1)
    assert always_stable(canvas, certain).tolist() == [True, True]


def test_tokens_per_forward_by_hand():
    """Row 0 writes EOS at canvas position 2 and finishes after one canvas; row 1 never does. With 3
    fixed steps per canvas and 2 canvases: row 0 has 3 tokens over 3 passes, row 1 8 over 6."""
    model = tiny_model()
    eos, word = 11, 5

    def force(input_ids, scores):
        forced = torch.full_like(scores, -1e4)
        forced[..., word] = 0.0
        forced[0, 2] = -1e4
        forced[0, 2, eos] = 0.0
        return forced

    out = model.generate(torch.tensor([[3, 4], [3, 4]]), max_new_tokens=8, max_denoising_steps=3,
                         confidence_threshold=None, eos_token_id=eos, pad_token_id=0, logits_processor=[force])
    assert out.sequences[:, 2:].tolist() == [[5, 5, 11, 0, 0, 0, 0, 0], [5] * 8]
    assert torch.allclose(out.tokens_per_forward, torch.tensor([3 / 3, 8 / 6]))


def test_generation_settings_priority_and_defaults():
    model = tiny_model()
    model.generation_config = DiffusionGemmaGenerationConfig(max_denoising_steps=7, t_min=0.1, t_max=0.2)
    config, model_kwargs = generation_settings(model, DiffusionGemmaGenerationConfig(t_max=0.9), {"t_min": 0.3,
                                                                                                  "use_cache": True})
    assert (config.max_denoising_steps, config.t_min, config.t_max) == (7, 0.3, 0.9)
    assert config.max_new_tokens == 256 and config.sampler_config.entropy_bound == 0.1
    assert (config.stability_threshold, config.confidence_threshold) == (1, 0.005)
    assert model_kwargs == {}
    assert model.generation_config.t_min == 0.1  # the model's own config is not modified


def test_generation_config_round_trip(tmp_path):
    config = DiffusionGemmaGenerationConfig.from_dict({
        "max_denoising_steps": 48, "eos_token_id": [1, 106, 50], "pad_token_id": 0, "t_min": 0.4, "t_max": 0.8,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
        "stability_threshold": 1, "confidence_threshold": 0.005, "transformers_version": "5.23.0"})
    assert config.sampler_config == EntropyBoundSamplerConfig(entropy_bound=0.1)
    config.save_pretrained(tmp_path)
    assert DiffusionGemmaGenerationConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_denoising_steps=0), "max_denoising_steps"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(t_min=0.5, t_max=0.5), "t_max"),
    (dict(t_min=-1.0), "t_min"),
    (dict(stability_threshold=-1), "stability_threshold"),
    (dict(confidence_threshold=0), "confidence_threshold"),
    (dict(sampler_config=0.1), "sampler_config"),
    (dict(sampler_config={"_cls_name": "TopKSamplerConfig", "k": 3}), "sampler_config"),
    (dict(eos_token_id="</s>"), "eos_token_id"),
    (dict(cache_implementation="quantized"), "cache_implementation"),
    (dict(temperature=0.7), "temperature"),
    (dict(fast_sampling=1), "fast_sampling"),
    (dict(cuda_graphs="no"), "cuda_graphs"),
])
def test_invalid_generation_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffusionGemmaGenerationConfig(**kwargs)
    with pytest.raises(ValueError, match=message):
        tiny_model().generate(torch.tensor([[3, 4]]), **kwargs)


def test_generate_argument_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="past_key_values.*cache_implementation"):
        model.generate(torch.tensor([[3, 4]]), past_key_values=KVCache(model.config.text_config),
                       cache_implementation="static")
    with pytest.raises(ValueError, match="max_length"):
        model.generate(torch.tensor([[3, 4, 5]]), max_length=3)
    with pytest.raises(ValueError, match="positions"):
        model.generate(torch.tensor([[3, 4]]), max_new_tokens=200_000)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.tensor([[3, 4]]), max_new_tokens=None)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate([[3, 4]])
    with pytest.raises(ValueError, match=r"`decoder_input_ids` must be a tensor of shape \(1, 4\).*got \(1, 3\)"):
        model.generate(torch.tensor([[3, 4]]), decoder_input_ids=torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match=r"`self_conditioning_logits` must be .*\(1, 4, 64\).*got list"):
        model.generate(torch.tensor([[3, 4]]), self_conditioning_logits=[[0.0]])


def test_cache_implementation_does_not_change_the_answer():
    model = tiny_model()
    outputs = []
    for implementation in (None, "dynamic", "static"):
        torch.manual_seed(0)
        outputs.append(model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=12, max_denoising_steps=3,
                                      cache_implementation=implementation).sequences)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


@torch.no_grad()
def test_results_do_not_depend_on_the_cache_layout():
    """Caches that hold the same tokens in differently sized buffers, with sliding layers trimmed at
    different moments, give bit-identical decoder logits."""
    model = tiny_model()
    chunks = [torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(n)) for n in (5, 4, 4, 4)]
    canvas = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(0))
    caches = [KVCache(model.config.text_config, canvas_length=room) for room in (0, 4, 50)]
    for chunk in chunks:
        logits = [model(input_ids=chunk, past_key_values=cache, decoder_input_ids=canvas).logits for cache in caches]
        assert all(torch.equal(logits[0], other) for other in logits[1:])
    starts = {cache.layers[0].start for cache in caches}
    assert len(starts) > 1, "the sliding layers should have been trimmed differently"


def test_bidirectional_all_mode_masks():
    """With use_bidirectional_attention='all' the encoder sees both ways; sliding layers within the
    halved window |q - k| <= w // 2 + 1."""
    config = DiffusionGemmaTextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
                                      sliding_window=6, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
                                      use_bidirectional_attention="all")
    assert config.sliding_window == 4 and config.to_dict()["sliding_window"] == 6
    full = encoder_mask(config, False, 2, 3, 0, 5, None, None, torch.device("cpu"))
    assert full.all()
    sliding = encoder_mask(config, True, 0, 10, 0, 10, None, None, torch.device("cpu"))[0, 0]
    q, k = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    assert torch.equal(sliding, (q - k).abs() <= 4)


@pytest.mark.parametrize("method", ["multinomial", "inverse_cdf"])
def test_sampling_follows_the_distribution(method):
    """Chi-square goodness of fit on a known distribution, with zero-probability tokens never drawn."""
    from diffusiongemma.engine.sampler import sample_tokens

    probs = torch.tensor([0.5, 0.2, 0.0, 0.15, 0.1, 0.05, 0.0, 0.0])
    torch.manual_seed(0)
    draws = sample_tokens(probs.expand(20_000, 8).reshape(200, 100, 8), method)
    assert draws.shape == (200, 100)
    counts = torch.bincount(draws.flatten(), minlength=8).double()
    assert counts[probs == 0].sum() == 0
    expected = 20_000 * probs.double()
    chi_square = ((counts - expected)[probs > 0] ** 2 / expected[probs > 0]).sum()
    assert chi_square < 18.5  # the 99.9th percentile of chi-square with 4 degrees of freedom


def test_fast_sampling_keeps_the_acceptance_behaviour():
    """Forced distributions leave no randomness in what is drawn: both samplers give the same canvases,
    accepted and committed the same way; the default stays on multinomial's random stream."""
    model = tiny_model()

    def force(input_ids, scores):
        forced = torch.full_like(scores, -1e4)
        forced[..., 9] = 0.0
        return forced

    outputs = []
    for fast in (False, True):
        torch.manual_seed(0)
        outputs.append(model.generate(torch.tensor([[3, 4]]), max_new_tokens=8, max_denoising_steps=4,
                                      logits_processor=[force], fast_sampling=fast))
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    assert torch.equal(outputs[0].tokens_per_forward, outputs[1].tokens_per_forward)
    with pytest.raises(ValueError, match="fast_sampling"):
        model.generate(torch.tensor([[3, 4]]), fast_sampling="yes")


def _distributions():
    """Peaked, flat, tied, with zeros, tiny vocabularies and a batch of rows: what a denoising step meets."""
    source = torch.Generator().manual_seed(7)
    for vocab, scale in ((4096, 20.0), (4096, 0.01), (3000, 3.0), (7, 1.0), (2, 5.0)):
        logits = torch.randn(24, vocab, generator=source) * scale
        yield torch.softmax(logits, dim=-1)
    tied = torch.zeros(8, 500)
    tied[:, 100:400:3] = 2.0
    yield torch.softmax(tied, dim=-1)
    zeros = torch.randn(16, 1000, generator=source)
    zeros[:, ::2] = -float("inf")
    yield torch.softmax(zeros, dim=-1)
    one_hot = torch.zeros(4, 64)
    one_hot[:, 5] = 1.0
    yield one_hot


@pytest.mark.parametrize("top_bounds", [1, 8])
def testmultinomial_from_words_is_torch_multinomial(monkeypatch, top_bounds):
    """The default sampler's tokens and the generator's state afterwards are torch.multinomial's, seed by
    seed: with an explicit generator and with the global one, and with the words drawn before the call.
    With one top bound every call searches whole rows for candidates; with 8 nearly none does."""
    from diffusiongemma.engine.sampler import (
        draw_multinomial_words,
        sample_tokens,
        words_reproduce_multinomial,
    )

    assert words_reproduce_multinomial(), "this torch build draws multinomial samples another way"
    monkeypatch.setattr("diffusiongemma.engine.sampler._TOP_BOUNDS", top_bounds)
    for index, probs in enumerate(_distributions()):
        for seed in range(3):
            expected_gen = torch.Generator().manual_seed(seed)
            expected = torch.multinomial(probs, 1, generator=expected_gen)[:, 0]
            generator = torch.Generator().manual_seed(seed)
            assert torch.equal(sample_tokens(probs, generator=generator), expected), (index, seed)
            assert torch.equal(generator.get_state(), expected_gen.get_state())

            generator = torch.Generator().manual_seed(seed)
            words = draw_multinomial_words(tuple(probs.shape), generator)
            assert torch.equal(sample_tokens(probs, generator=generator, words=words), expected)
            assert torch.equal(generator.get_state(), expected_gen.get_state())

            torch.manual_seed(seed)
            global_tokens = sample_tokens(probs[None])
            assert global_tokens.shape == (1, probs.shape[0])
            assert torch.equal(global_tokens[0], expected)
            assert torch.equal(torch.get_rng_state(), expected_gen.get_state())


def test_multinomial_hands_torch_the_cases_it_alone_answers(monkeypatch):
    """A zero variate (u = 0 gives an infinite ratio, or NaN beside a zero probability, which torch's
    argmax would pick) goes back to torch.multinomial from the state before the words; probabilities that
    are not finite get torch's error."""
    from diffusiongemma.engine.sampler import (
        MultinomialWords,
        draw_multinomial_words,
        sample_tokens,
    )

    calls = []
    multinomial = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda *args, **kwargs: calls.append(1) or multinomial(*args, **kwargs))
    probs = torch.softmax(torch.randn(4, 300, generator=torch.Generator().manual_seed(1)), dim=-1)
    probs[2, 17] = 0.0
    for case, (row, col) in enumerate(((1, 40), (2, 17))):
        generator = torch.Generator().manual_seed(5)
        drawn = draw_multinomial_words(tuple(probs.shape), generator)
        after = generator.get_state()
        words = drawn.words.clone()
        words[row, col] = 0
        forged = MultinomialWords(words, drawn.generator, drawn.state_before)
        # Forged so the words path alone would say `col`; torch's draw from the same state decides instead.
        expected = multinomial(probs, 1, generator=torch.Generator().manual_seed(5))[:, 0]
        assert torch.equal(sample_tokens(probs, generator=generator, words=forged), expected)
        assert torch.equal(generator.get_state(), after)
        assert len(calls) == case + 1, "the forged word should have sent the draw back to torch"

    broken = probs.clone()
    broken[0, 3] = float("nan")
    with pytest.raises(RuntimeError) as ours:
        sample_tokens(broken)
    with pytest.raises(RuntimeError) as theirs:
        torch.multinomial(broken, 1)
    assert str(ours.value) == str(theirs.value)


def test_words_drawn_ahead_change_nothing(monkeypatch):
    """generate draws each step's words while the decoder runs; the tokens and the global generator's
    state afterwards equal those of sampling with torch.multinomial itself. A caller's logits processor
    that draws random numbers keeps the reference's order (its draw comes before the step's words)."""
    import diffusiongemma.engine.state as state

    model = tiny_model(canvas_length=8)
    prompt = torch.tensor([[3, 4, 5]])
    settings = dict(max_new_tokens=24, max_denoising_steps=5)

    def drawing_processor(input_ids, scores):
        return scores + 1e-3 * torch.rand(scores.shape)

    def run(**extra):
        torch.manual_seed(11)
        out = model.generate(prompt, **settings, **extra).sequences
        return out, torch.get_rng_state()

    ahead = run()
    ahead_with_processor = run(logits_processor=[drawing_processor])
    monkeypatch.setattr(state, "samples_from_words", lambda device: False)
    monkeypatch.setattr("diffusiongemma.engine.sampler.samples_from_words", lambda device: False)
    for ours, torchs in ((ahead, run()), (ahead_with_processor, run(logits_processor=[drawing_processor]))):
        assert torch.equal(ours[0], torchs[0])
        assert torch.equal(ours[1], torchs[1])


def test_generate_after_fork():
    """A process forked after `generate` drew words ahead gets a word drawer of its own (the parent's
    worker thread does not survive the fork), so generating there finishes with the parent's tokens."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, sys, torch
        torch.set_num_threads(1)  # OpenMP's own thread pool does not survive a fork either
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from conftest import tiny_model
        model = tiny_model()
        def run():
            torch.manual_seed(0)
            return model.generate(torch.tensor([[3, 4]]), max_new_tokens=8, max_denoising_steps=3).sequences
        parent = run()
        pid = os.fork()
        if pid == 0:
            os._exit(0 if torch.equal(run(), parent) else 1)
        _, status = os.waitpid(pid, 0)
        print("child exit", os.waitstatus_to_exitcode(status))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "child exit 0"


def test_a_failing_decoder_leaves_no_draw_running(monkeypatch):
    """When the decoder fails mid-generate, the words drawn for that step are finished before the error
    reaches the caller, so the global generator does not move afterwards."""
    import diffusiongemma.engine.runner as runner
    from diffusiongemma.engine.sampler import draw_multinomial_words

    def slow_draw(*args):
        time.sleep(0.3)
        return draw_multinomial_words(*args)

    monkeypatch.setattr(runner, "draw_multinomial_words", slow_draw)
    model = tiny_model(canvas_length=8)
    monkeypatch.setattr(model.model.decoder, "forward", lambda *args, **kwargs: 1 / 0)
    torch.manual_seed(3)
    with pytest.raises(ZeroDivisionError):
        model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=8, max_denoising_steps=2)
    state = torch.get_rng_state()
    time.sleep(0.5)
    assert torch.equal(torch.get_rng_state(), state)


def test_sampling_filters_by_hand():
    from diffusiongemma.engine.sampler import SamplingFilters

    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    assert torch.equal(SamplingFilters(top_k=2).apply(probs), torch.tensor([[0.0, 0.4, 0.0, 0.3, 0.0]]))
    # 0.4 + 0.3 = 0.7 falls short of 0.75, so the third most likely (0.15) is kept too.
    assert torch.equal(SamplingFilters(top_p=0.75).apply(probs), torch.tensor([[0.0, 0.4, 0.0, 0.3, 0.15]]))
    assert torch.equal(SamplingFilters(top_p=0.7).apply(probs), torch.tensor([[0.0, 0.4, 0.0, 0.3, 0.0]]))
    # At least a third as likely as 0.4.
    assert torch.equal(SamplingFilters(min_p=1 / 3).apply(probs), torch.tensor([[0.0, 0.4, 0.0, 0.3, 0.15]]))
    assert torch.equal(SamplingFilters(top_k=3, min_p=0.5).apply(probs), torch.tensor([[0.0, 0.4, 0.0, 0.3, 0.0]]))
    assert not SamplingFilters().active and SamplingFilters(top_p=0.5).active
    for bad, name in ((dict(top_k=-1), "top_k"), (dict(top_p=0), "top_p"), (dict(min_p=1), "min_p")):
        with pytest.raises(ValueError, match=name):
            SamplingFilters(**bad)


def test_a_filtered_step_samples_only_kept_tokens_and_accepts_as_unfiltered():
    """With top_k 1 every sampled token is the argmax (a bound this high accepts every position); the
    entropies, and with them the acceptance and the self-conditioning input, are those of the unfiltered
    logits."""
    from diffusiongemma.engine.sampler import SamplingFilters
    from diffusiongemma.engine.state import Denoising, SamplingPlan
    from diffusiongemma.engine.step import denoise_step

    logits = torch.randn(2, 8, 50, generator=torch.Generator().manual_seed(0))
    canvases = []
    for filters in (SamplingFilters(), SamplingFilters(top_k=1)):
        plan = SamplingPlan.resolve(torch.device("cpu"), 4, 0.4, 0.8, 100.0, 1, 0.005, filters=filters)
        canvas = Denoising(plan, torch.Generator().manual_seed(1), 2, 8, 50, torch.device("cpu"))
        canvas.start()
        denoise_step([canvas], logits, torch.float32, None)
        canvases.append(canvas)
    plain, filtered = canvases
    assert torch.equal(filtered.current, filtered.argmax) and not torch.equal(plain.current, plain.argmax)
    assert torch.equal(filtered.self_conditioning_logits, plain.self_conditioning_logits)
    assert torch.equal(filtered.argmax, plain.argmax)
