"""The server's passes where CUDA graphs are captured: every request in its own row (slot) of one preallocated
`StaticKVCache`, the decoder pass replayed per bucket of rows, commits per row (`graphs.SlotPasses`,
`runner.SlotsRunner`), run on the CPU with the stand-in graphs of `test_graphs.py`.

On CUDA the experts' fused kernel gives each row its own bits; here the stand-in for it is a product per
row (`rowwise_experts`), since the CPU's tiles read their sizes back to the host, which no capture allows.
"""

import queue
import threading

import pytest
import torch
from conftest import randomize, served_texts, tiny_model
from test_graphs import RecordedGraph, stand_in_graphs  # noqa: F401 (a fixture)

from diffusiongemma.engine import graphs
from diffusiongemma.engine.runner import SlotsRunner
from diffusiongemma.model import layers
from diffusiongemma.model.cache import KVCache
from diffusiongemma.serving import scheduler as engine

CANVAS = 4


def rowwise_experts(x, weight, ends):
    """Each row times its expert's weight alone, with nothing read back to the host: what the fused kernel
    guarantees on CUDA, a row's bits whatever else is in the call."""
    expert = torch.searchsorted(ends, torch.arange(x.shape[0], device=x.device, dtype=ends.dtype), right=True)
    return torch.bmm(x[:, None], weight[expert].transpose(1, 2))[:, 0]


@pytest.fixture
def slots(stand_in_graphs, monkeypatch):  # noqa: F811
    monkeypatch.setattr(engine, "captures", lambda device: True)
    monkeypatch.setattr(layers, "grouped_linear", rowwise_experts)
    return stand_in_graphs


def kv_encode(model, cache, tokens):
    start = cache.get_seq_length()
    positions = torch.arange(start, start + tokens.shape[1])[None]
    model.model.encoder(input_ids=tokens, past_key_values=cache, position_ids=positions)


def kv_scores(model, cache, canvas, logits):
    start = cache.get_seq_length()
    positions = torch.arange(start, start + CANVAS)[None]
    return model.decoder_scores(cache, None, positions, canvas, logits)


@torch.no_grad()
def test_rows_give_each_request_the_numbers_of_its_own_cache(slots):
    """Three requests of their own lengths (one past the sliding window, 6), prompts encoded in pieces:
    each row's scores, before and after a commit, agree with its own `KVCache`'s to rounding; a row's
    commit replays its graph, and a freed row takes the last request in use."""
    model = randomize(tiny_model(canvas_length=CANVAS))
    runner = SlotsRunner(model, slots=4, capacity=32, soft_capped=True)
    prompts = [torch.arange(3, 12)[None], torch.arange(20, 23)[None], torch.arange(30, 44)[None]]
    rows, caches = [runner.new_cache() for _ in prompts], [KVCache(model.config.text_config, CANVAS) for _ in prompts]
    for slot, cache, prompt in zip(rows, caches, prompts):
        for piece in prompt.split(5, dim=1):
            runner.encode(slot, piece)
            kv_encode(model, cache, piece)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        canvases = torch.randint(3, 60, (3, CANVAS), generator=generator)
        signals = [None, torch.randn(1, CANVAS, 64, generator=generator), torch.randn(1, CANVAS, 64, generator=generator)]
        scores = runner.decode(rows, canvases, signals)
        for row, cache in enumerate(caches):
            expected = kv_scores(model, cache, canvases[row:row + 1], signals[row])
            torch.testing.assert_close(scores[row:row + 1], expected)
        for slot, cache, canvas in zip(rows, caches, canvases):
            runner.commit(slot, canvas[None])
            kv_encode(model, cache, canvas[None])
    assert sorted(runner.passes.commits) == [0, 1, 2]
    assert list(runner.passes.decoders) == [(4, True)]

    runner.release(rows[0])
    assert [slot.index for slot in rows[1:]] == [1, 0]
    canvases = torch.randint(3, 60, (2, CANVAS), generator=generator)
    scores = runner.decode(rows[1:], canvases, [None, None])
    for row, cache in enumerate(caches[1:]):
        torch.testing.assert_close(scores[row:row + 1], kv_scores(model, cache, canvases[row:row + 1], None))
    assert (2, True) in runner.passes.decoders


@torch.no_grad()
def test_a_row_gets_the_same_bits_in_any_bucket(slots):
    """A request's scores alone (a bucket of one row) and beside others (a bucket of four, one of them an
    empty row) are equal bit for bit."""
    model = randomize(tiny_model(canvas_length=CANVAS))
    prompt, canvas = torch.arange(3, 12)[None], torch.arange(40, 44)[None]
    alone = SlotsRunner(model, slots=4, capacity=32, soft_capped=False)
    slot = alone.new_cache()
    alone.encode(slot, prompt)
    expected = alone.decode([slot], canvas, [None]).clone()

    beside = SlotsRunner(model, slots=4, capacity=32, soft_capped=False)
    others = [beside.new_cache(), beside.new_cache()]
    beside.encode(others[0], torch.arange(5, 25)[None])
    beside.encode(others[1], torch.arange(7, 9)[None])
    slot = beside.new_cache()
    beside.encode(slot, prompt)
    scores = beside.decode([slot, others[0]], torch.cat([canvas, torch.arange(50, 54)[None]]), [None, None])
    assert torch.equal(scores[:1], expected)
    assert list(beside.passes.decoders) == [(4, False)]


def answers(model, tokenizer, prompts, seeds, late=(), **options):
    """Each prompt's answer served with its seed; the prompts at indices in `late` arrive once the others
    have started."""
    scheduler = engine.Scheduler(model, tokenizer, max_batch=4, max_queue=8, **options)
    events = [queue.Queue() for _ in prompts]
    started = threading.Event()

    def listen(index):
        def emit(event):
            started.set()
            events[index].put(event)
        return emit

    def submit(index):
        settings = engine.resolve_settings(model, len(prompts[index]), max_tokens=12, seed=seeds[index],
                                           max_denoising_steps=4, max_model_len=scheduler.max_model_len)
        scheduler.submit(engine.Request(prompts[index], settings, listen(index), drafts=True))

    scheduler.start()
    try:
        for index in range(len(prompts)):
            if index not in late:
                submit(index)
        started.wait(30)
        for index in late:
            submit(index)
        return served_texts(events), scheduler
    finally:
        scheduler.stop()


def test_served_requests_get_their_answers_alone_in_any_batch(slots, tiny, monkeypatch):
    """Prompts of several lengths, alone and side by side, some arriving while others run, and rows freed
    under running requests: the same answers, which are those of the per-request caches; the passes replay
    graphs (decoder per bucket, commit per row) over one preallocated cache."""
    moves = []
    move = graphs.SlotPasses.move
    monkeypatch.setattr(graphs.SlotPasses, "move", lambda self, *rows: moves.append(rows) or move(self, *rows))
    model, processor = tiny
    tokenizer = processor.tokenizer
    prompts = [tokenizer.encode(text) for text in ("a question", "a somewhat longer question than the first one",
                                                   "three", "and a fourth question, arriving late")]
    seeds = [7, 8, 9, 10]
    alone = [answers(model, tokenizer, [prompt], [seed])[0][0] for prompt, seed in zip(prompts, seeds)]
    together, scheduler = answers(model, tokenizer, prompts, seeds, late=(2, 3))
    assert together == alone and moves
    assert isinstance(scheduler.runner, SlotsRunner) and not scheduler.runner.taken
    passes = scheduler.runner.passes
    assert passes.cache.capacity == scheduler.max_model_len == model.config.text_config.max_position_embeddings
    assert passes.decoders and all(rows in (1, 2, 4) for rows, _ in passes.decoders)
    assert sum(graph.replays for graph, _ in passes.decoders.values()) == scheduler.metrics.batched_steps
    assert sum(graph.replays for graph in RecordedGraph.instances) > len(RecordedGraph.instances)
    monkeypatch.setattr(engine, "captures", lambda device: False)
    assert answers(model, tokenizer, prompts, seeds)[0] == alone


def test_a_request_longer_than_the_rows_is_refused(slots, tiny):
    model, processor = tiny
    scheduler = engine.Scheduler(model, processor.tokenizer, max_batch=2, max_model_len=64)
    assert scheduler.max_model_len == scheduler.runner.passes.cache.capacity == 64
    engine.resolve_settings(model, 40, max_tokens=24, max_model_len=scheduler.max_model_len)
    with pytest.raises(ValueError, match="`max_tokens` \\(25\\) is too large: .* 64 tokens per request"):
        engine.resolve_settings(model, 40, max_tokens=25, max_model_len=scheduler.max_model_len)
    # Left unset, the answer takes the room the prompt leaves.
    assert engine.resolve_settings(model, 60, max_model_len=64).max_tokens == 4
    unchecked = engine.resolve_settings(model, 40, max_tokens=25)
    with pytest.raises(ValueError, match="exceed this scheduler's 64 tokens"):
        scheduler.submit(engine.Request(list(range(3, 43)), unchecked, lambda event: None))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.Scheduler(model, processor.tokenizer, max_model_len=0)


def test_rows_default_to_at_most_the_slot_context(slots, monkeypatch, capsys):
    """Rows are made at start, so their default length is bounded; the CLI's help says by how much."""
    from diffusiongemma.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    serve_help = capsys.readouterr().out
    assert f"at most {engine.SLOT_CONTEXT})" in " ".join(serve_help.split())
    monkeypatch.setattr(engine, "SLOT_CONTEXT", 48)
    scheduler = engine.Scheduler(tiny_model(canvas_length=CANVAS), None, max_batch=3)
    assert scheduler.max_model_len == scheduler.runner.passes.cache.capacity == 48
    assert scheduler.runner.passes.slots == 3


def test_the_switch_keeps_the_server_eager(slots):
    from diffusiongemma.engine.runner import RequestsRunner

    scheduler = engine.Scheduler(tiny_model(canvas_length=CANVAS), None, cuda_graphs=False)
    assert isinstance(scheduler.runner, RequestsRunner)
    # The model's positions: its caches grow as needed.
    assert scheduler.max_model_len == scheduler.model.config.text_config.max_position_embeddings


def test_buckets_are_powers_of_two_up_to_the_slots():
    assert [graphs.bucket(rows, 6) for rows in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert [graphs.bucket(rows, 16) for rows in (1, 3, 5, 9, 16)] == [1, 4, 8, 16, 16]
