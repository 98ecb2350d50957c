"""The CUDA-graph path of `generate`, run on the CPU with a stand-in graph.

The stand-in records the aten operations of the captured pass and replays exactly those, on the same
tensors, as a CUDA graph replays its kernels on the same addresses. Python that ran during the capture
does not run again, so a pass that depended on it, or inputs not copied into the captured buffers, give
other tokens here as they would on the device. As a capture runs no kernel, what the pass computed is
overwritten with NaN (or -1) when the recording ends, until a replay computes it. An operation that asks
the device for a value or draws random numbers fails the recording, as it would fail a capture.
"""

import contextlib
import gc

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import randomize, tiny_model

from diffusiongemma import DiffusionGemmaGenerationConfig
from diffusiongemma import fused, generation, graphs
from diffusiongemma import cache as cache_module
from diffusiongemma.cache import decoder_mask, unpadded_from

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

    def capture_begin(self):
        self.recording = Recording(self)
        self.recording.__enter__()

    def capture_end(self):
        self.recording.__exit__(None, None, None)
        self.poison()

    def poison(self):
        """A capture runs no kernel: what the pass wrote into memory of its own holds no value until a
        replay. Writes into tensors that existed before (the cache) are left, as replays redo them."""
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

    def __torch_dispatch__(self, function, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = function.overloadpacket.__name__
        if any(name.startswith(forbidden) for forbidden in FORBIDDEN):
            raise RuntimeError(f"{name} cannot be captured in a CUDA graph")
        out = function(*args, **kwargs)
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
    monkeypatch.setattr(generation, "_selects_without_asking", lambda device: True)
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
        self.drafts.append(logits)

    def end(self):
        pass


def assert_replays_are_eager(model, prompt, seed, **settings):
    """Runs `generate` eagerly, then with the stand-in graphs: the tokens, `tokens_per_forward` and every
    step's logits must be the same. Returns the eager output."""
    eager_drafts, replayed_drafts = LogitsDrafts(), LogitsDrafts()
    eager = generate(model, prompt, seed, cuda_graphs=False, streamer=eager_drafts, **settings)
    assert not RecordedGraph.instances
    replayed = generate(model, prompt, seed, streamer=replayed_drafts, **settings)
    assert torch.equal(replayed.sequences, eager.sequences)
    assert torch.equal(replayed.tokens_per_forward, eager.tokens_per_forward)
    # Rows that stopped keep their last logits, which a later replay must not overwrite.
    assert all(torch.equal(a, b) for a, b in zip(replayed_drafts.drafts, eager_drafts.drafts, strict=True))
    return eager


@pytest.mark.parametrize("name", list(SETTINGS))
def test_replayed_passes_give_the_eager_tokens_and_logits(stand_in_graphs, name):
    model = tiny_model()
    prompt = torch.tensor([[3, 4, 5], [9, 8, 7], [20, 30, 40]])
    settings = SETTINGS[name]
    eager = assert_replays_are_eager(model, prompt, 1, **settings)
    canvases = settings["max_new_tokens"] // model.config.canvas_length
    assert len(stand_in_graphs) == canvases  # one capture per canvas
    assert sum(graph.replays for graph in stand_in_graphs) > 0
    if name.startswith("adaptive stopping"):
        # The case is only tested if rows did stop at different steps.
        assert len(set(eager.tokens_per_forward.tolist())) > 1
    else:
        # Every canvas is captured on its first step. The process's first capture follows an eager pass that
        # gives that step's logits; later ones replay for theirs.
        steps = settings["max_denoising_steps"]
        assert [graph.replays for graph in stand_in_graphs] == [steps - 1] + [steps] * (canvases - 1)


# A CUDA graph records a Triton kernel's launch like any other; the stand-in records what torch dispatches,
# so here the fused norm is a custom operator, recorded and replayed whole.
@torch.library.custom_op("diffusiongemma_tests::rms_norm", mutates_args=())
def dispatched_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return fused_rms_norm(x, weight, eps)


fused_rms_norm = fused.rms_norm


def test_replayed_passes_with_the_fused_kernels(stand_in_graphs, monkeypatch):
    """The step as it runs on CUDA: replayed passes with the fused norms in them, and the fused sampler's
    kernel in place of torch's sampling operations, whose self-conditioning output a replay reads (under
    Triton's interpreter)."""
    calls, denoise = [], fused.denoise
    monkeypatch.setattr(fused, "usable", lambda device: True)
    monkeypatch.setattr(fused, "denoise", lambda *args: calls.append(args[3]) or denoise(*args))
    monkeypatch.setattr(fused, "rms_norm", lambda *args: calls.append("norm") or dispatched_rms_norm(*args))
    model = tiny_model()
    prompt = torch.tensor([[3, 4, 5], [9, 8, 7], [20, 30, 40]])
    eager = assert_replays_are_eager(model, prompt, 1, **SETTINGS["adaptive stopping"])
    assert {"norm", "multinomial"} <= set(calls)
    assert len(set(eager.tokens_per_forward.tolist())) > 1


def test_a_bfloat16_model_replays_its_eager_numbers_from_the_first_step(stand_in_graphs):
    """The first step replays with a self-conditioning mask of zeros where the eager pass has no
    self-conditioning at all; the numbers must not tell them apart, in the released model's dtype too."""
    model = randomize(tiny_model()).to(torch.bfloat16)
    prompt = torch.tensor([[3, 4, 5], [9, 8, 7]])
    settings = SETTINGS["fixed steps"]
    assert_replays_are_eager(model, prompt, 2, **settings)
    assert len(stand_in_graphs) == settings["max_new_tokens"] // model.config.canvas_length


def test_a_first_canvas_with_self_conditioning_of_the_callers_replays_it_too(stand_in_graphs):
    model = randomize(tiny_model())
    prompt = torch.tensor([[3, 4, 5], [9, 8, 7]])
    signal = 4 * torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(3))
    assert_replays_are_eager(model, prompt, 4, max_new_tokens=8, max_denoising_steps=4,
                             self_conditioning_logits=signal)
    assert len(stand_in_graphs) == 2


def test_a_padded_batch_replays_its_passes_too(stand_in_graphs):
    model = tiny_model()
    prompt = torch.tensor([[0, 0, 5, 6], [9, 8, 7, 6]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert_replays_are_eager(model, prompt, 3, attention_mask=mask, max_new_tokens=8, max_denoising_steps=4,
                             pad_token_id=0)
    assert len(stand_in_graphs) == 2


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


def test_two_steps_or_the_switch_keep_the_passes_eager(stand_in_graphs):
    model = tiny_model()
    prompt = torch.tensor([[3, 4, 5], [9, 8, 7]])
    model.generate(prompt, max_new_tokens=4, max_denoising_steps=2)
    model.generate(prompt, max_new_tokens=4, cuda_graphs=False)
    assert not stand_in_graphs
    model.generate(prompt, max_new_tokens=4, max_denoising_steps=3)
    assert len(stand_in_graphs) == 1


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
