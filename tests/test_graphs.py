"""The CUDA-graph path of `generate`, run on the CPU with a stand-in graph.

The stand-in records the aten operations of the captured pass and replays exactly those, on the same
tensors, as a CUDA graph replays its kernels on the same addresses. Python that ran during the capture
does not run again, so a pass that depended on it, or inputs not copied into the captured buffers, give
other tokens here as they would on the device. As a capture runs no kernel, what the pass computed is
overwritten with NaN (or -1) when the recording ends, until a replay computes it. An operation that asks
the device for a value or draws random numbers fails the recording, as it would fail a capture.
"""

import contextlib
import copy
import gc
import weakref

import pytest
import torch
from conftest import randomize, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from diffusiongemma import DiffusionGemmaGenerationConfig
from diffusiongemma.engine import generate as generation
from diffusiongemma.engine import graphs, step
from diffusiongemma.kernels import fused
from diffusiongemma.model import cache as cache_module
from diffusiongemma.model.cache import (
    KVCache,
    StaticKVCache,
    decoder_mask,
    unpadded_from,
)

# Operations a capture cannot hold: reading a value back to the host, or drawing from a generator the
# graph does not know about.
FORBIDDEN = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "equal", "is_nonzero", "item",
             "random", "rand", "multinomial", "normal", "uniform", "exponential", "bernoulli")


class RecordedGraph:
    instances: list = []

    def __init__(self):
        self.operations = []
        self.replays = 0
        RecordedGraph.instances.append(self)

    def capture_begin(self, capture_error_mode="global"):
        self.recording = Recording(self)
        self.recording.__enter__()

    def capture_end(self):
        self.recording.__exit__(None, None, None)
        self.undo()

    def undo(self):
        """A capture runs no kernel. What the pass wrote into tensors that existed before it (the cache) is
        put back, and what it wrote into memory of its own holds no value until a replay."""
        for tensor, before in reversed(self.recording.overwritten):
            tensor.copy_(before)
        for _, args, kwargs, out in self.operations:
            inputs = {leaf.untyped_storage().data_ptr() for leaf in tree_leaves((args, kwargs))
                      if isinstance(leaf, torch.Tensor)}
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                    tensor.fill_(float("nan") if tensor.is_floating_point() else -1)

    def replay(self):
        self.replays += 1
        for function, args, kwargs, recorded in self.operations:
            result = function(*args, **kwargs)
            for into, value in zip(tree_leaves(recorded), tree_leaves(result)):
                if isinstance(into, torch.Tensor) and into is not value:
                    into.copy_(value)


class Recording(TorchDispatchMode):
    def __init__(self, graph: RecordedGraph):
        super().__init__()
        self.graph = graph
        self.made: set[int] = set()  # storages the recorded operations allocated
        self.overwritten: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, its value before)

    def __torch_dispatch__(self, function, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = function.overloadpacket.__name__
        if any(name.startswith(forbidden) for forbidden in FORBIDDEN):
            raise RuntimeError(f"{name} cannot be captured in a CUDA graph")
        for argument, value in zip(function._schema.arguments, list(args) + list(kwargs.values())):
            written = argument.alias_info is not None and argument.alias_info.is_write
            if written and isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in self.made:
                self.overwritten.append((value, value.clone()))
        out = function(*args, **kwargs)
        # Views share their input's storage: only new storages count as made.
        inputs = {leaf.untyped_storage().data_ptr() for leaf in tree_leaves((args, kwargs))
                  if isinstance(leaf, torch.Tensor)}
        self.made |= {leaf.untyped_storage().data_ptr() for leaf in tree_leaves(out)
                      if isinstance(leaf, torch.Tensor)} - inputs
        self.graph.operations.append((function, args, kwargs, out))
        return out


class Stream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def stand_in_graphs(monkeypatch):
    RecordedGraph.instances = []
    monkeypatch.setattr(generation, "captures", lambda device: True)
    # Kept rows are selected as on an accelerator: without asking the device whether any row stopped.
    monkeypatch.setattr(step, "_selects_without_asking", lambda device: True)
    monkeypatch.setattr(graphs, "_WARM_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", RecordedGraph)
    return RecordedGraph.instances


def generate(model, prompt, seed, **settings):
    torch.manual_seed(seed)
    return model.generate(prompt, **settings)


SETTINGS = {
    "fixed steps": dict(max_new_tokens=12, max_denoising_steps=5, confidence_threshold=None),
    # No temperature: the pass's own logits become the next pass's self-conditioning input.
    "no temperature": dict(max_new_tokens=8, max_denoising_steps=4, t_min=None, t_max=None,
                           confidence_threshold=None),
    # Rows stop at different steps and keep their logits while the others go on.
    "adaptive stopping": dict(max_new_tokens=12, max_denoising_steps=8, t_min=0.004, t_max=0.008,
                              stability_threshold=1, confidence_threshold=0.5),
    # ... and the logits they keep are a pass's own.
    "adaptive stopping, no temperature": dict(max_new_tokens=12, max_denoising_steps=8, t_min=None, t_max=None,
                                              stability_threshold=1, confidence_threshold=5.0),
}


class LogitsDrafts:
    """A streamer that takes each step's logits as its draft."""

    _takes_logits = True

    def __init__(self):
        self.drafts = []

    def put(self, value):
        pass

    def put_draft(self, logits):
        # On the CPU `.cpu()` hands over the tensor itself, which may be a buffer the next step overwrites.
        self.drafts.append(logits.clone())

    def end(self):
        pass


def assert_replays_are_eager(model, prompt, seed, **settings):
    """Runs `generate` eagerly, then with the stand-in graphs: the tokens and `tokens_per_forward` must be the
    same and every step's logits agree to rounding (the static cache's attention sums over masked slots, in
    another order). Returns the eager output."""
    eager_drafts, replayed_drafts = LogitsDrafts(), LogitsDrafts()
    captured = len(RecordedGraph.instances)
    eager = generate(model, prompt, seed, cuda_graphs=False, streamer=eager_drafts, **settings)
    assert len(RecordedGraph.instances) == captured
    replayed = generate(model, prompt, seed, streamer=replayed_drafts, **settings)
    assert torch.equal(replayed.sequences, eager.sequences)
    assert torch.equal(replayed.tokens_per_forward, eager.tokens_per_forward)
    # Rows that stopped keep their last logits, which a later replay must not overwrite.
    assert len(replayed_drafts.drafts) == len(eager_drafts.drafts)
    for replayed_logits, eager_logits in zip(replayed_drafts.drafts, eager_drafts.drafts):
        torch.testing.assert_close(replayed_logits, eager_logits, rtol=1e-3, atol=1e-3)
    return eager


def graph_roles(model) -> dict:
    """Which captured graph does what: {"decoder": [...], "commit": [...]} of the model's `GraphedPasses`."""
    held = graphs.HELD[model]
    return {"decoder": [graph for graph, _ in held.decoders.values()],
            "commit": [] if held.commit_graph is None else [held.commit_graph]}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_replayed_passes_give_the_eager_tokens_and_logits(stand_in_graphs, name):
    model = tiny_model()
    prompt = torch.tensor([[3, 4, 5], [9, 8, 7], [20, 30, 40]])
    settings = SETTINGS[name]
    eager = assert_replays_are_eager(model, prompt, 1, **settings)
    canvases = settings["max_new_tokens"] // model.config.canvas_length
    roles = graph_roles(model)
    # One capture of the decoder pass and one of the commit serve every canvas.
    assert len(stand_in_graphs) == 2 and len(roles["decoder"]) == len(roles["commit"]) == 1
    assert roles["commit"][0].replays == canvases - 1
    if name.startswith("adaptive stopping"):
        # The case is only tested if rows did stop at different steps.
        assert len(set(eager.tokens_per_forward.tolist())) > 1
    else:
        assert roles["decoder"][0].replays == canvases * settings["max_denoising_steps"]


# A CUDA graph records a Triton kernel's launch like any other; the stand-in records what torch dispatches,
# so here each fused kernel of the pass is a custom operator, recorded and replayed whole.
@torch.library.custom_op("diffusiongemma_tests::rms_norm", mutates_args=())
def dispatched_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return fused_rms_norm(x, weight, eps)


fused_rms_norm = fused.rms_norm


@torch.library.custom_op("diffusiongemma_tests::softmax", mutates_args=())
def dispatched_softmax(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return fused_softmax(x, dtype)


fused_softmax = fused.softmax


@torch.library.custom_op("diffusiongemma_tests::grouped_linear", mutates_args=())
def dispatched_grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return fused_grouped_linear(x, weight, ends)


fused_grouped_linear = fused.grouped_linear


def test_replayed_passes_with_the_fused_kernels(stand_in_graphs, monkeypatch):
    """The step as it runs on CUDA: replayed passes with the fused norms, the experts' fused products and the
    self-conditioning input's fused softmax in them, and the fused sampler's kernel in place of torch's sampling operations, whose
    self-conditioning output a replay reads (under Triton's interpreter)."""
    calls, denoise = [], fused.denoise
    monkeypatch.setattr(fused, "usable", lambda device: True)
    monkeypatch.setattr(fused, "denoise", lambda *args: calls.append(args[3]) or denoise(*args))
    monkeypatch.setattr(fused, "rms_norm", lambda *args: calls.append("norm") or dispatched_rms_norm(*args))
    monkeypatch.setattr(fused, "softmax", lambda *args: calls.append("softmax") or dispatched_softmax(*args))
    monkeypatch.setattr(fused, "grouped_linear",
                        lambda *args: calls.append("experts") or dispatched_grouped_linear(*args))
    model = tiny_model()
    prompt = torch.tensor([[3, 4, 5], [9, 8, 7], [20, 30, 40]])
    eager = assert_replays_are_eager(model, prompt, 1, **SETTINGS["adaptive stopping"])
    assert {"norm", "softmax", "experts", "multinomial"} <= set(calls)
    assert len(set(eager.tokens_per_forward.tolist())) > 1


@torch.no_grad()
def test_a_mask_of_zeros_gives_the_pass_without_self_conditioning():
    """A captured pass always has a self-conditioning input; on a canvas's first step its mask is zeros, which
    must give exactly the numbers of a pass without one, whatever the input holds, in the released model's
    dtype too."""
    for dtype in (torch.float32, torch.bfloat16):
        model = randomize(tiny_model()).to(dtype)
        prompt = torch.tensor([[3, 4, 5], [9, 8, 7]])
        cache = model(input_ids=prompt, decoder_input_ids=torch.ones(2, 4, dtype=torch.long)).past_key_values
        canvas = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
        stale = 8 * torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
        without = model.model.decoder(decoder_input_ids=canvas, past_key_values=cache).last_hidden_state
        masked = model.model.decoder(decoder_input_ids=canvas, past_key_values=cache, self_conditioning_logits=stale,
                                     self_conditioning_mask=torch.zeros(2, dtype=dtype)).last_hidden_state
        assert torch.equal(masked, without)
        signal = model.model.decoder(decoder_input_ids=canvas, past_key_values=cache, self_conditioning_logits=stale,
                                     self_conditioning_mask=torch.ones(2, dtype=dtype)).last_hidden_state
        assert not torch.equal(signal, without)


def test_a_first_canvas_with_self_conditioning_of_the_callers_replays_it_too(stand_in_graphs):
    model = randomize(tiny_model())
    prompt = torch.tensor([[3, 4, 5], [9, 8, 7]])
    signal = 4 * torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(3))
    assert_replays_are_eager(model, prompt, 4, max_new_tokens=8, max_denoising_steps=4,
                             self_conditioning_logits=signal)


def test_a_padded_batch_replays_its_passes_too(stand_in_graphs):
    model = tiny_model()
    prompt = torch.tensor([[0, 0, 5, 6], [9, 8, 7, 6]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert_replays_are_eager(model, prompt, 3, attention_mask=mask, max_new_tokens=8, max_denoising_steps=4,
                             pad_token_id=0)


def test_graphs_are_reused_across_calls_until_the_shape_or_the_weights_change(stand_in_graphs):
    model = randomize(tiny_model())
    settings = dict(max_new_tokens=12, max_denoising_steps=3)
    # Prompts of 3, 5 and 8 tokens with two canvases committed fit one capacity (16, filled by the last):
    # one pair of captures, and each call gives the tokens it gives eagerly, with a longer window than the
    # model's (6) in the cache.
    for length, seed in ((3, 5), (5, 6), (8, 7), (3, 7)):
        assert_replays_are_eager(model, torch.arange(3, 3 + 2 * length).view(2, length), seed, **settings)
    assert len(stand_in_graphs) == 2
    assert_replays_are_eager(model, torch.arange(3, 3 + 2 * 9).view(2, 9), 8, **settings)  # capacity 32
    assert len(stand_in_graphs) == 4
    assert_replays_are_eager(model, torch.arange(3, 3 + 9).view(1, 9), 8, **settings)  # batch 1
    assert len(stand_in_graphs) == 6
    with torch.no_grad():
        model.model.backbone.norm.weight = torch.nn.Parameter(model.model.backbone.norm.weight * 1.5)
    assert_replays_are_eager(model, torch.arange(3, 3 + 9).view(1, 9), 8, **settings)
    assert len(stand_in_graphs) == 8


def test_a_conversation_goes_on_from_the_cache_a_replayed_call_returns(stand_in_graphs):
    """The cache given to `generate` is extended in place and returned, with graphs as without."""
    model = randomize(tiny_model())
    settings = dict(max_new_tokens=8, max_denoising_steps=3)
    prompt, follow_up = torch.tensor([[3, 4, 5, 6, 7, 8, 9]]), torch.tensor([[10, 11, 12]])

    def first_cache(graphs):
        return generate(model, prompt, 9, cuda_graphs=graphs, **settings).past_key_values

    expected = generate(model, follow_up, 10, past_key_values=first_cache(False), cuda_graphs=False, **settings)
    for first_graphs, then_graphs in ((False, True), (True, False), (True, True)):
        cache = first_cache(first_graphs)
        out = generate(model, follow_up, 10, past_key_values=cache, cuda_graphs=then_graphs, **settings)
        assert torch.equal(out.sequences, expected.sequences)
        assert out.past_key_values is cache and cache.get_seq_length() == expected.past_key_values.get_seq_length()


def test_where_padding_ends_is_read_once_per_mask_version(monkeypatch):
    reads = []
    scalar = torch.Tensor.__int__
    monkeypatch.setattr(torch.Tensor, "__int__", lambda self: reads.append(1) or scalar(self))
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    assert torch.equal(decoder_mask(mask, 0, 4), mask[:, None, None, 0:4])
    assert decoder_mask(mask, 1, 4) is None  # no padding from key 1 on
    assert decoder_mask(mask, 1, 4) is None
    assert len(reads) == 1
    mask[1, 2] = False  # an in-place change is a new question
    assert torch.equal(decoder_mask(mask, 1, 4), mask[:, None, None, 1:4])
    assert decoder_mask(mask, 3, 4) is None
    assert len(reads) == 2
    assert unpadded_from(torch.ones(2, 5, dtype=torch.bool)) == 0
    assert unpadded_from(torch.tensor([[1, 0, 1, 1, 1], [0, 1, 1, 1, 1]])) == 2
    # Nothing keeps a mask alive.
    before = len(cache_module._UNPADDED_FROM)
    del mask
    gc.collect()
    assert len(cache_module._UNPADDED_FROM) == before - 1


def test_the_switch_keeps_the_passes_eager(stand_in_graphs):
    model = tiny_model()
    prompt = torch.tensor([[3, 4, 5], [9, 8, 7]])
    model.generate(prompt, max_new_tokens=8, cuda_graphs=False)
    assert not stand_in_graphs
    model.generate(prompt, max_new_tokens=8, max_denoising_steps=2)
    assert len(stand_in_graphs) == 2


def test_the_switch_is_written_only_when_off(tmp_path):
    assert "cuda_graphs" not in DiffusionGemmaGenerationConfig().to_dict()
    DiffusionGemmaGenerationConfig(cuda_graphs=False).save_pretrained(tmp_path)
    assert DiffusionGemmaGenerationConfig.from_pretrained(tmp_path).cuda_graphs is False


def test_the_stand_in_fails_on_what_a_capture_cannot_hold(stand_in_graphs):
    graph = RecordedGraph()
    with pytest.raises(RuntimeError, match="_local_scalar_dense"), Recording(graph):
        bool(torch.ones(2).sum() > 1)
    with pytest.raises(RuntimeError, match="randint"), Recording(graph):
        torch.randint(0, 5, (3,))


@pytest.mark.parametrize("case", ["padding", "image blocks", "bidirectional encoder", "grouped heads"])
@torch.no_grad()
def test_the_static_cache_gives_the_numbers_of_the_dynamic_one(case):
    """Prefill, commits and decoder passes over a `StaticKVCache` (fixed slots, masks from a device count,
    query heads folded over their key/value heads) against a `KVCache`, past the sliding window (6): equal
    to rounding. Its round trip through a `KVCache` is exact."""
    overrides = {"bidirectional encoder": dict(use_bidirectional_attention="all"),
                 "grouped heads": dict(num_attention_heads=6, num_key_value_heads=2, num_global_key_value_heads=3)}
    model = randomize(tiny_model(**overrides.get(case, {})))
    text, canvas_length = model.config.text_config, model.config.canvas_length
    prompt = torch.arange(3, 21).view(2, 9)
    mask = torch.ones(2, 9, dtype=torch.bool)
    blocks = None
    if case == "padding":
        mask[0, :3] = False
    if case == "image blocks":
        blocks = torch.tensor([[-1, 0, 0, 0, -1, 1, 1, -1, -1], [0, 0, -1, -1, -1, -1, 1, 1, 1]])
    dynamic = KVCache(text, canvas_length)
    static = StaticKVCache(text, 2, 32, canvas_length, torch.float32, torch.device("cpu"))
    static.start(mask)

    def encode(cache, tokens, padding, block_ids=None):
        static_cache = cache is static
        out = model.model.encoder.language_model(
            input_ids=tokens, past_key_values=cache, attention_mask=None if static_cache else padding,
            position_ids=static.positions(tokens.shape[1]) if static_cache else None, block_ids=block_ids)
        if static_cache:
            static.advance(tokens.shape[1])
        return out.last_hidden_state

    torch.testing.assert_close(encode(static, prompt, mask, blocks)[mask], encode(dynamic, prompt, mask, blocks)[mask])
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        canvas = torch.randint(3, 60, (2, canvas_length), generator=generator)
        signal = torch.randn(2, canvas_length, 64, generator=generator)
        mask = torch.nn.functional.pad(mask, (0, canvas_length), value=True)
        decoded = [model.model.decoder(decoder_input_ids=canvas, past_key_values=cache, self_conditioning_logits=signal,
                                       **extra).last_hidden_state
                   for cache, extra in ((static, dict(decoder_position_ids=static.positions(canvas_length))),
                                        (dynamic, dict(decoder_attention_mask=mask)))]
        torch.testing.assert_close(*decoded)
        torch.testing.assert_close(encode(static, canvas, mask), encode(dynamic, canvas, mask))
    assert static.get_seq_length() == dynamic.get_seq_length() == 21

    copied = StaticKVCache(text, 2, 32, canvas_length, torch.float32, torch.device("cpu"))
    copied.start(mask, dynamic)
    for back, source in zip(copied.to_dynamic().layers, dynamic.layers):
        count = min(source.length, source.keep) if source.is_sliding else source.length
        assert (back.start, back.used) == (source.length - count, count)
        assert torch.equal(back.keys, source.keys[:, :, source.used - back.used:source.used])
        assert torch.equal(back.values, source.values[:, :, source.used - back.used:source.used])


def test_a_call_never_shares_the_graphs_another_call_is_using(stand_in_graphs):
    """A second call while the first holds the graphs (in another thread) gets its own."""
    model = tiny_model()
    prompt = torch.tensor([[3, 4, 5], [9, 8, 7]])
    generate(model, prompt, 0, max_new_tokens=8, max_denoising_steps=2)
    held = graphs.HELD[model]
    generate(model, prompt, 0, max_new_tokens=8, max_denoising_steps=2)
    assert graphs.HELD[model] is held and len(stand_in_graphs) == 2
    held.lock.acquire()
    assert_replays_are_eager(model, prompt, 0, max_new_tokens=8, max_denoising_steps=2)
    assert graphs.HELD[model] is not held and len(stand_in_graphs) == 4
    assert not graphs.HELD[model].lock.locked()


class FailingStreamer(LogitsDrafts):
    """Fails on the draft of its `fails_at`-th step."""

    def __init__(self, fails_at: int):
        super().__init__()
        self.fails_at = fails_at

    def put_draft(self, logits):
        super().put_draft(logits)
        if len(self.drafts) == self.fails_at:
            raise RuntimeError("the streamer failed")


def test_a_call_that_fails_leaves_the_graphs_to_the_next(stand_in_graphs):
    model = tiny_model()
    prompt = torch.tensor([[3, 4, 5], [9, 8, 7]])
    settings = dict(max_new_tokens=8, max_denoising_steps=2)
    # On the second canvas's first step: both passes were captured.
    with pytest.raises(RuntimeError, match="the streamer failed"):
        generate(model, prompt, 0, streamer=FailingStreamer(fails_at=3), **settings)
    held = graphs.HELD[model]
    assert not held.lock.locked() and len(graph_roles(model)["commit"]) == 1
    assert_replays_are_eager(model, prompt, 0, **settings)
    assert graphs.HELD[model] is held and len(stand_in_graphs) == 2


@pytest.mark.parametrize("queries_masked_apart", [False, True])
def test_folded_attention_is_grouped_query_attention(monkeypatch, queries_masked_apart):
    """Against SDPA's own grouped path, with a mask for all queries (the decoder's) or one per query (the
    encoder's), and with the output layout CUDA's fused kernels return (transposed, not contiguous)."""
    from diffusiongemma.model.attention import folded_attention as _folded_attention

    generator = torch.Generator().manual_seed(0)
    q, keys, values = (torch.randn(2, heads, length, 8, generator=generator)
                       for heads, length in ((6, 5), (2, 7), (2, 7)))
    mask = torch.rand(2, 1, 5 if queries_masked_apart else 1, 7, generator=generator) > 0.3
    mask[..., 0] = True
    expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0,
                                                                enable_gqa=True)
    attention = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: attention(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2))
    torch.testing.assert_close(_folded_attention(q, keys, values, mask), expected)


def test_the_graphs_go_with_the_model_and_stay_out_of_its_copies(stand_in_graphs):
    model = tiny_model()
    generate(model, torch.tensor([[3, 4, 5]]), 0, max_new_tokens=8, max_denoising_steps=2)
    assert graphs.HELD[model].decoders
    copied = copy.deepcopy(model)
    assert copied not in graphs.HELD
    alive = weakref.ref(model)
    del model
    # Nothing the graphs hold refers back to the model: it goes without waiting for the cycle collector.
    assert alive() is None
