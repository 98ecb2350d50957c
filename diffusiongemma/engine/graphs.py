"""CUDA graphs of the decoder pass and of a canvas's commit: for `generate` on CUDA (`GraphedPasses`), and for
the server's requests side by side (`SlotPasses`).

`graphed_passes(model, batch, tokens)` returns the model's `GraphedPasses` for that batch and at least that
many committed tokens, locked for the caller: the one the model holds when its shape and weights match and
no other call holds it, else a new one in its place. Each pass is captured on its first use and replayed
after that, across canvases and calls; only the prompt's prefill runs eagerly. The passes run over a
`StaticKVCache`, whose attention's last bits differ from `KVCache`'s, so the graph path is never taken on the
CPU. Captures run on a side stream per device, after one eager warm-up pass per process and device. Design
notes: docs/graphs.md.

`SlotPasses` holds one `StaticKVCache` whose rows (slots) are requests of their own lengths: the decoder pass
over the first rows replays a graph captured per bucket of rows (1, 2, 4, ..., up to the slots), a row's
commit a graph captured per row; prompts are encoded eagerly, a row at a time.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Callable

import torch

from ..model.cache import StaticKVCache


def captures(device: torch.device) -> bool:
    """Whether passes on `device` are captured."""
    return device.type == "cuda"


# Per device, the stream captures run on, once it has run the eager pass the first capture needs.
_WARM_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _capture(run: Callable[[], torch.Tensor | None], device: torch.device, warm_up: bool):
    """(graph, what `run` returns as the graph's buffer). `warm_up` lets the process's first capture run the
    pass once eagerly first; only a pass that can run twice may ask for it."""
    # The model's device, which need not be the current one: its streams are the ones to order by.
    with torch.cuda.device(device):
        side = _WARM_STREAMS.get(device)
        if side is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            if warm_up:
                with torch.cuda.stream(side):
                    run()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        try:
            # What `torch.cuda.graph` does, less its synchronisation of the device and its emptying of the
            # allocator's cache, which would idle the device and hand the sampler's vocabulary-sized buffers
            # back to the driver. Only this thread is held to what a capture allows: another `generate`
            # may be waiting for its device in another.
            with torch.cuda.stream(side):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    output = run()
                finally:
                    graph.capture_end()
        except RuntimeError as error:
            raise RuntimeError(f"capturing a pass in a CUDA graph failed ({error}); run the passes eagerly with "
                               "generate(..., cuda_graphs=False) or serve --no-cuda-graphs") from error
        _WARM_STREAMS[device] = side
        torch.cuda.current_stream().wait_stream(side)
    return graph, output


class GraphedPasses:
    """A model's decoder pass and commit over one `StaticKVCache` of `batch` rows and `capacity` committed
    tokens, each captured on its first use. `key` says which model state the graphs read: the shape and the
    addresses of every weight and buffer. `lock` is held by the `generate` call using it."""

    def __init__(self, model, batch: int, capacity: int, key: tuple):
        # Weakly: `HELD` keeps these for as long as the model lives, and must not keep the model alive.
        self._model = weakref.ref(model)
        self.key = key
        self.lock = threading.Lock()
        weight = model.model.backbone.embed_tokens.weight
        self.canvas_length = model.config.canvas_length
        self.cache = StaticKVCache(model.config.text_config, batch, capacity, self.canvas_length, weight.dtype,
                                   weight.device)
        self.canvas = torch.zeros(batch, self.canvas_length, dtype=torch.long, device=weight.device)
        self.self_conditioning_logits = torch.zeros(batch, self.canvas_length, model.config.text_config.vocab_size,
                                                    dtype=weight.dtype, device=weight.device)
        self.self_conditioning_mask = torch.zeros(batch, dtype=weight.dtype, device=weight.device)
        # Per `soft_capped`: (graph, logits buffer).
        self.decoders: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.commit_graph: torch.cuda.CUDAGraph | None = None

    @property
    def model(self):
        return self._model()

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past, **images) -> None:
        """Eagerly: empties the cache (or fills it with `past`'s tokens) and encodes the prompt."""
        self.cache.start(attention_mask, past)
        count = input_ids.shape[1]
        self.model.model.encoder(input_ids=input_ids, past_key_values=self.cache,
                                 position_ids=self.cache.positions(count), **images)
        self.cache.advance(count)

    def commit(self, tokens: torch.Tensor) -> None:
        """Encodes a committed canvas, by replaying the commit's graph."""
        self.canvas.copy_(tokens)
        if self.commit_graph is None:
            # It writes the cache, so it must not run twice: a commit comes after its first decoder pass,
            # which warmed the stream up.
            self.commit_graph, _ = _capture(self._commit, self.canvas.device, warm_up=False)
        self.commit_graph.replay()
        self.cache.advance(self.canvas_length)

    def decode(self, current: torch.Tensor, self_conditioning_logits: torch.Tensor | None,
               soft_capped: bool) -> torch.Tensor:
        """The decoder pass's logits (see `BlockDiffusionLM.decoder_scores`), in the graph's buffer: valid until the
        next pass."""
        self.canvas.copy_(current)
        if self_conditioning_logits is None:
            self.self_conditioning_mask.zero_()
        else:
            # The fused sampler writes the input into the buffer itself (`step.denoise_step`'s `into`).
            if self_conditioning_logits is not self.self_conditioning_logits:
                self.self_conditioning_logits.copy_(self_conditioning_logits)
            self.self_conditioning_mask.fill_(1)
        if soft_capped not in self.decoders:
            self.decoders[soft_capped] = _capture(lambda: self._decode(soft_capped), self.canvas.device,
                                                  warm_up=True)
        graph, logits = self.decoders[soft_capped]
        graph.replay()
        return logits

    def _decode(self, soft_capped: bool) -> torch.Tensor:
        return self.model.decoder_scores(self.cache, None, self.cache.positions(self.canvas_length), self.canvas,
                                  self.self_conditioning_logits, self.self_conditioning_mask,
                                  soft_capped=soft_capped)

    def _commit(self) -> None:
        self.model.model.encoder(input_ids=self.canvas, past_key_values=self.cache,
                                 position_ids=self.cache.positions(self.canvas_length))

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`, or a copy of it where it is a graph's logits buffer (as the self-conditioning input of a
        float32 model without temperature is), which the next replay overwrites."""
        buffers = {logits.untyped_storage().data_ptr() for _, logits in self.decoders.values()}
        return tensor.clone() if tensor.untyped_storage().data_ptr() in buffers else tensor


# Per model, the `GraphedPasses` of its last call: outside the module, so that copying or pickling a model
# never meets a CUDA graph, and dropped with the model.
HELD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def graphed_passes(model, batch: int, tokens: int) -> GraphedPasses:
    """The model's `GraphedPasses` for `batch` rows and at least `tokens` committed tokens, locked for the
    caller, who releases it when done, failed or not: the one it holds if that fits, its weights have not
    moved and no other call is using it, else a new one in its place. Capacities are powers of two, so that
    calls of about the same length share one."""
    capacity = 1 << max(tokens - 1, 0).bit_length()
    key = (batch, capacity, tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers())))
    held = HELD.get(model)
    if held is not None and held.key == key and held.lock.acquire(blocking=False):
        return held
    # The old graphs and buffers go (unless a call still uses them) before the new ones are allocated.
    HELD.pop(model, None)
    passes = GraphedPasses(model, batch, capacity, key)
    passes.lock.acquire()
    HELD[model] = passes
    return passes


def bucket(rows: int, slots: int) -> int:
    """The rows a decoder pass over the first `rows` slots runs over: the next power of two, at most `slots`."""
    return min(1 << max(rows - 1, 0).bit_length(), slots)


class SlotPasses:
    """The passes of requests side by side, each in its own row (slot) of one `StaticKVCache` of `slots` rows
    and `capacity` committed tokens per row. `lengths` holds each row's committed count on the host."""

    def __init__(self, model, slots: int, capacity: int):
        weight = model.model.backbone.embed_tokens.weight
        text = model.config.text_config
        self.model, self.slots = model, slots
        self.canvas_length = model.config.canvas_length
        self.cache = StaticKVCache(text, slots, capacity, self.canvas_length, weight.dtype, weight.device)
        self.lengths = [0] * slots
        self.canvas = torch.zeros(slots, self.canvas_length, dtype=torch.long, device=weight.device)
        self.self_conditioning_logits = torch.zeros(slots, self.canvas_length, text.vocab_size, dtype=weight.dtype,
                                                    device=weight.device)
        self.self_conditioning_mask = torch.zeros(slots, dtype=weight.dtype, device=weight.device)
        # Per (bucket, soft_capped): (graph, logits buffer); per row: its commit's graph.
        self.decoders: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.commits: dict[int, torch.cuda.CUDAGraph] = {}

    def _row(self, slot: int) -> StaticKVCache:
        row = self.cache.rows(slot, slot + 1)
        row.length = self.lengths[slot]
        return row

    def clear(self, slot: int) -> None:
        """Empties a row for a new request."""
        self.lengths[slot] = 0
        self.cache.used[slot] = 0

    def move(self, source: int, target: int) -> None:
        """Moves a request's row to another slot, so that the rows in use stay the first ones."""
        for layer in self.cache.layers:
            layer.keys[target] = layer.keys[source]
            layer.values[target] = layer.values[source]
        self.cache.used[target] = self.cache.used[source]
        self.lengths[target] = self.lengths[source]

    def encode(self, slot: int, tokens: torch.Tensor, **images) -> None:
        """Eagerly appends `tokens` [1, count] (and the model inputs of the images among them) to a row."""
        row = self._row(slot)
        count = tokens.shape[1]
        self.model.model.encoder(input_ids=tokens, past_key_values=row, position_ids=row.positions(count), **images)
        row.advance(count)
        self.lengths[slot] += count

    def commit(self, slot: int, tokens: torch.Tensor) -> None:
        """Appends a committed canvas [1, canvas] to a row, by replaying the row's commit graph."""
        self.canvas[slot].copy_(tokens[0])
        if slot not in self.commits:
            # It writes the cache, so it must not run twice: a commit comes after the row's first decoder
            # pass, which warmed the stream up.
            self.commits[slot], _ = _capture(lambda: self._commit(slot), self.canvas.device, warm_up=False)
        self.commits[slot].replay()
        self.cache.used[slot] += self.canvas_length
        self.lengths[slot] += self.canvas_length

    def decode(self, slots: list[int], current: torch.Tensor, self_conditioning_logits: list,
               soft_capped: bool) -> torch.Tensor:
        """Scores [len(slots), canvas, vocab] (see `BlockDiffusionLM.decoder_scores`) of the canvases `current`
        over rows `slots`, each row's self-conditioning input given as [1, canvas, vocab] or None. The rows
        run in a pass over the first slots, padded to their bucket; the scores of rows in place are a view of
        the graph's buffer, valid until the next pass."""
        index = torch.tensor(slots, device=self.canvas.device)
        self.canvas.index_copy_(0, index, current)
        given = [logits is not None for logits in self_conditioning_logits]
        self.self_conditioning_mask.index_copy_(0, index, torch.tensor(given, dtype=self.self_conditioning_mask.dtype,
                                                                       device=index.device))
        for slot, logits in zip(slots, self_conditioning_logits):
            if logits is not None:
                self.self_conditioning_logits[slot].copy_(logits[0])
        rows = bucket(max(slots) + 1, self.slots)
        if (rows, soft_capped) not in self.decoders:
            self.decoders[rows, soft_capped] = _capture(lambda: self._decode(rows, soft_capped), self.canvas.device,
                                                        warm_up=True)
        graph, logits = self.decoders[rows, soft_capped]
        graph.replay()
        return logits[:len(slots)] if slots == list(range(len(slots))) else logits.index_select(0, index)

    def _decode(self, rows: int, soft_capped: bool) -> torch.Tensor:
        cache = self.cache.rows(0, rows)
        return self.model.decoder_scores(cache, None, cache.positions(self.canvas_length), self.canvas[:rows],
                                         self.self_conditioning_logits[:rows], self.self_conditioning_mask[:rows],
                                         soft_capped=soft_capped)

    def _commit(self, slot: int) -> None:
        row = self._row(slot)
        self.model.model.encoder(input_ids=self.canvas[slot:slot + 1], past_key_values=row,
                                 position_ids=row.positions(self.canvas_length))
