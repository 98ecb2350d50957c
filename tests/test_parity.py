"""Same numbers and same tokens as the reference implementation, on tiny random checkpoints."""

import functools
import tempfile

import pytest
import torch
from conftest import make_reference

from diffusiongemma import DiffusionGemmaForBlockDiffusion

VOCAB = 384
TEXT_TOKENS = 380  # ids below the boi/eoi/image tokens the fixture reserves at the top

CONFIGS = {
    "tiny": dict(text_overrides=None, vision=True),
    "five_to_one": dict(text_overrides=dict(num_hidden_layers=6, layer_types=None, num_global_key_value_heads=None,
                                            sliding_window=8, use_bidirectional_attention=None), vision=False),
    # A window shorter than the canvas, every expert chosen.
    "narrow_window": dict(text_overrides=dict(sliding_window=5, num_experts=4, top_k_experts=4), vision=False),
}


# Cold temperatures make the random models confident, so that adaptive stopping really stops.
CONFIDENT = dict(t_min=0.004, t_max=0.008)


@functools.cache
def pair(name: str):
    """(reference model, our model loaded from the reference's saved checkpoint)."""
    reference = make_reference(**CONFIGS[name])
    # Removed at once: without a vision config the reference writes a full-size vision tower (650 MB).
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        return reference, DiffusionGemmaForBlockDiffusion.from_pretrained(folder)


def assert_same(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Bit for bit: the engine runs the reference's float operations in the reference's order, which is
    what keeps same-seed tokens identical; the relative error is printed to tell rounding from a bug."""
    error = (ours - reference).abs().max() / reference.abs().max()
    assert torch.equal(ours, reference), f"not bit-identical; relative error {error:.2e}"


def tokens(*shape, seed=0):
    return torch.randint(3, TEXT_TOKENS, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("prompt_length", [5, 30])
@torch.no_grad()
def test_logits_short_and_long_prompt(name, prompt_length):
    reference, ours = pair(name)
    prompt, canvas = tokens(2, prompt_length), tokens(2, 8, seed=1)
    assert_same(ours(input_ids=prompt, decoder_input_ids=canvas).logits,
                 reference(input_ids=prompt, decoder_input_ids=canvas).logits)


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_logits_left_padded_batch(name):
    reference, ours = pair(name)
    prompt, canvas = tokens(3, 20), tokens(3, 8, seed=1)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, :6] = 0
    mask[2, :17] = 0
    prompt[mask == 0] = 0
    decoder_mask = torch.nn.functional.pad(mask, (0, 8), value=1)
    kwargs = dict(input_ids=prompt, attention_mask=mask, decoder_input_ids=canvas, decoder_attention_mask=decoder_mask)
    ours_logits, reference_logits = ours(**kwargs).logits, reference(**kwargs).logits
    for row in range(3):  # each row against the reference, so that a small row is not hidden by a large one
        assert_same(ours_logits[row], reference_logits[row])


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_logits_with_self_conditioning(name):
    reference, ours = pair(name)
    prompt, canvas = tokens(2, 9), tokens(2, 8, seed=1)
    previous = 4 * torch.randn(2, 8, VOCAB, generator=torch.Generator().manual_seed(2))
    for mask in (None, torch.tensor([True, False])):
        kwargs = dict(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=previous,
                      self_conditioning_mask=mask)
        assert_same(ours(**kwargs).logits, reference(**kwargs).logits)
    # The signal matters: without it the logits differ.
    plain = ours(input_ids=prompt, decoder_input_ids=canvas).logits
    assert (plain - ours(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=previous).logits
            ).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_logits_after_several_committed_canvases(name):
    """Prompt, then three canvases committed one by one (crossing the sliding window), then a decoder
    step with explicit positions, against the reference's default cache."""
    reference, ours = pair(name)
    chunks = [tokens(2, 6)] + [tokens(2, 8, seed=s) for s in (1, 2, 3)]
    canvas = tokens(2, 8, seed=9)
    ours_cache = reference_cache = None
    for chunk in chunks:
        ours_out = ours(input_ids=chunk, past_key_values=ours_cache, decoder_input_ids=canvas)
        reference_out = reference(input_ids=chunk, past_key_values=reference_cache, decoder_input_ids=canvas)
        ours_cache, reference_cache = ours_out.past_key_values, reference_out.past_key_values
        assert_same(ours_out.logits, reference_out.logits)
    assert ours_cache.get_seq_length() == reference_cache.get_seq_length() == 30
    positions = torch.arange(30, 38)[None]
    assert_same(ours(past_key_values=ours_cache, decoder_input_ids=canvas, decoder_position_ids=positions).logits,
                 reference(past_key_values=reference_cache, decoder_input_ids=canvas,
                           decoder_position_ids=positions).logits)


def generate_both(name, input_ids, seed=0, **kwargs):
    reference, ours = pair(name)
    torch.manual_seed(seed)
    expected = reference.generate(input_ids.clone(), **kwargs)
    torch.manual_seed(seed)
    actual = ours.generate(input_ids.clone(), **kwargs)
    return actual, expected


def assert_same_generation(actual, expected):
    assert torch.equal(actual.sequences, expected.sequences)
    assert torch.equal(actual.tokens_per_forward, expected.tokens_per_forward)


@torch.no_grad()
def test_bfloat16_checkpoints_give_the_reference_bits():
    """The GPU's dtype: float32 exactly where the reference keeps it (norms, router, rotary angles, logits)."""
    from transformers import DiffusionGemmaForBlockDiffusion as Reference

    with tempfile.TemporaryDirectory() as folder:
        make_reference(**CONFIGS["five_to_one"]).save_pretrained(folder)
        reference = Reference.from_pretrained(folder, dtype=torch.bfloat16).eval()
        ours = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype="bfloat16")
    prompt, canvas = tokens(2, 30), tokens(2, 8, seed=1)
    previous = 4 * torch.randn(2, 8, VOCAB, generator=torch.Generator().manual_seed(2))
    kwargs = dict(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=previous)
    assert_same(ours(**kwargs).logits, reference(**kwargs).logits)
    settings = dict(max_new_tokens=16, max_denoising_steps=4)
    torch.manual_seed(0)
    expected = reference.generate(prompt, **settings)
    torch.manual_seed(0)
    assert_same_generation(ours.generate(prompt, **settings), expected)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_fixed_steps(name):
    actual, expected = generate_both(name, tokens(2, 14), max_new_tokens=20, max_denoising_steps=5,
                                     confidence_threshold=None)
    assert_same_generation(actual, expected)
    assert actual.sequences.shape == (2, 14 + 24)  # whole canvases: ceil(20 / 8) = 3
    assert torch.allclose(actual.tokens_per_forward, torch.tensor([24 / 15, 24 / 15]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_adaptive_stopping(name):
    actual, expected = generate_both(name, tokens(2, 10), max_new_tokens=24, max_denoising_steps=12, **CONFIDENT)
    assert_same_generation(actual, expected)
    # Adaptive stopping must have cut canvases short: fewer than 12 passes per 8 tokens.
    assert (actual.tokens_per_forward > 8 / 12).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_eos_inside_a_canvas_in_a_batch(name):
    prompt = tokens(2, 10)
    dry, _ = generate_both(name, prompt, max_new_tokens=24, max_denoising_steps=8, **CONFIDENT)
    eos = int(dry.sequences[0, 10 + 3])  # a token row 0 produces in its first canvas
    actual, expected = generate_both(name, prompt, max_new_tokens=24, max_denoising_steps=8,
                                     eos_token_id=[eos, 1], pad_token_id=0, **CONFIDENT)
    assert_same_generation(actual, expected)
    first_eos = (actual.sequences[0, 10:] == eos).nonzero()[0, 0]
    assert (actual.sequences[0, 10 + first_eos + 1:] == 0).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_left_padded_batch(name):
    prompt = tokens(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    prompt[mask == 0] = 0
    actual, expected = generate_both(name, prompt, attention_mask=mask, max_new_tokens=16, max_denoising_steps=4)
    assert_same_generation(actual, expected)


def test_generate_continues_from_past_key_values():
    prompt = tokens(1, 10)
    first, first_reference = generate_both("tiny", prompt, max_new_tokens=16, max_denoising_steps=4)
    assert_same_generation(first, first_reference)
    follow_up = torch.cat([first.sequences[:, -8:], tokens(1, 5, seed=4)], dim=1)
    reference, ours = pair("tiny")
    torch.manual_seed(5)
    expected = reference.generate(follow_up, past_key_values=first_reference.past_key_values, max_new_tokens=8,
                                  max_denoising_steps=4)
    torch.manual_seed(5)
    actual = ours.generate(follow_up, past_key_values=first.past_key_values, max_new_tokens=8, max_denoising_steps=4)
    assert_same_generation(actual, expected)
    assert actual.past_key_values.get_seq_length() == expected.past_key_values.get_seq_length()


def test_generate_with_given_canvas_max_length_and_custom_hooks():
    class Boost:
        def __call__(self, input_ids, scores):
            scores = scores.clone()
            scores[..., 7] += 3.0
            return scores

    class StopAfterTwoCanvases:
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 10 + 16)

    from transformers import LogitsProcessorList, StoppingCriteriaList

    prompt = tokens(2, 10)
    actual, expected = generate_both("tiny", prompt, decoder_input_ids=tokens(2, 8, seed=3), max_length=50,
                                     max_denoising_steps=3, logits_processor=LogitsProcessorList([Boost()]),
                                     stopping_criteria=StoppingCriteriaList([StopAfterTwoCanvases()]))
    assert_same_generation(actual, expected)
    assert actual.sequences.shape[1] == 10 + 16


def test_streamer_sees_the_same_calls():
    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(("put", value.clone()))

        def put_draft(self, value):
            self.calls.append(("draft", value.clone()))

        def end(self):
            self.calls.append(("end", None))

    recorders = Recorder(), Recorder()
    reference, ours = pair("tiny")
    for model, recorder in zip((reference, ours), recorders):
        torch.manual_seed(0)
        model.generate(tokens(1, 6), streamer=recorder, max_new_tokens=16, max_denoising_steps=6, **CONFIDENT)
    expected, actual = (r.calls for r in recorders)
    assert [kind for kind, _ in actual] == [kind for kind, _ in expected]
    assert all(a is None or torch.equal(a, b) for (_, a), (_, b) in zip(actual, expected))
    assert actual[0][0] == "put" and actual[-1][0] == "end" and any(kind == "draft" for kind, _ in actual)
