"""Model runners: how the model's passes run, apart from what they compute.

The engine asks a runner for three things: encode tokens into the cache (a prompt, or a committed canvas),
and the decoder's scores for the canvases being denoised. A runner owns the cache those passes use and the
device, and chooses how they run:

- `EagerRunner`: eager passes over a `KVCache`, the reference's numbers on the CPU (`generate` by default);
- `GraphedRunner`: the decoder pass and the commit replayed from CUDA graphs over a `StaticKVCache`
  (`generate` on CUDA; see `graphs.py`);
- `RequestsRunner`: many requests, each over its own `KVCache`, whose canvases share one decoder pass
  (the server on the CPU). A row gets the numbers it would get alone: the token-wise products give each
  row its own bits (measured on the CPU's BLAS, whose kernel for a row does not change with the row count
  at these shapes), attention runs per request over its own cache, and the experts' products run in fixed
  tiles (`kernels.experts.row_independent`);
- `SlotsRunner`: many requests, each in its own row (slot) of one preallocated `StaticKVCache`, whose
  decoder pass and commits replay CUDA graphs (`graphs.SlotPasses`; the server on CUDA). A row's attention
  runs over its own slots, and the experts' fused kernel gives each row its own bits; the token-wise
  products are cuBLAS's, which may choose its kernel by row count, so a batch can move a token's last bits.

A runner built with `soft_capped=True` gives soft-capped float32 logits; with `soft_capped=False`, the LM
head's scores, which the fused kernel (or `step.denoise_step`, for a plan without it) soft-caps itself
(`BlockDiffusionLM.decoder_scores`). On the CPU `RequestsRunner` hands them over as `step.RowScores`, made
a block of requests at a time.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..kernels.experts import row_independent
from ..model.cache import KVCache, RequestCaches
from .graphs import GraphedPasses, SlotPasses
from .sampler import MultinomialWords, draw_multinomial_words
from .step import RowScores


@functools.cache
def _word_drawer() -> ThreadPoolExecutor:
    """A denoising step's random words do not depend on its logits; one worker draws them while the
    decoder runs (its small products keep one core busy, not all)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffusiongemma-words")


# A forked child inherits the executor but not its thread: it must make its own.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_word_drawer.cache_clear)


def draw_words_in_background(shape: tuple[int, int], generator: torch.Generator | None) -> Future:
    """Starts drawing a step's multinomial words (see `sampler.draw_multinomial_words`); only for a
    generator that nothing else draws from until the step samples."""
    return _word_drawer().submit(draw_multinomial_words, shape, generator)


def decode_drawing_words(decode, groups) -> tuple[torch.Tensor, list[MultinomialWords | None]]:
    """`decode()`'s scores, with each group's multinomial words drawn meanwhile where its plan asks."""
    futures = [draw_words_in_background((g.rows * g.canvas_length, g.vocab_size), g.generator)
               if g.plan.draw_ahead else None for g in groups]
    try:
        scores = decode()
    finally:
        # Even when the decoder fails: nothing may go on drawing from a caller's generator afterwards.
        words = [f.result() if f is not None else None for f in futures]
    return scores, words


class EagerRunner:
    """Eager passes over one `KVCache` for a batch of rows (a `generate` call)."""

    def __init__(self, model, cache: KVCache, soft_capped: bool):
        self.model, self.cache, self.soft_capped = model, cache, soft_capped
        self.mask = self.positions = None
        self.self_conditioning_buffer = None

    def encode(self, tokens, attention_mask, positions, **images) -> None:
        self.model.model.encoder(input_ids=tokens, attention_mask=attention_mask, past_key_values=self.cache,
                                 position_ids=positions, **images)

    def start_canvas(self, attention_mask, positions) -> None:
        self.mask, self.positions = attention_mask, positions

    def decode(self, current, self_conditioning_logits) -> torch.Tensor:
        return self.model.decoder_scores(self.cache, self.mask, self.positions, current, self_conditioning_logits,
                              soft_capped=self.soft_capped)

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class GraphedRunner:
    """The decoder pass and the commit replayed from CUDA graphs (`GraphedPasses`); the prompt's prefill
    runs eagerly, its length being the caller's."""

    def __init__(self, passes: GraphedPasses, past: KVCache | None, soft_capped: bool):
        self.passes, self.past, self.soft_capped = passes, past, soft_capped
        self.cache = passes.cache
        self.prefilled = False
        # The fused sampler writes the next self-conditioning input straight into the graph's buffer.
        self.self_conditioning_buffer = passes.self_conditioning_logits

    def encode(self, tokens, attention_mask, positions, **images) -> None:
        if self.prefilled:
            self.passes.commit(tokens)
        else:
            self.passes.prefill(tokens, attention_mask, self.past, **images)
            self.prefilled = True

    def start_canvas(self, attention_mask, positions) -> None:
        pass

    def decode(self, current, self_conditioning_logits) -> torch.Tensor:
        return self.passes.decode(current, self_conditioning_logits, soft_capped=self.soft_capped)

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.passes.keep(tensor)


class RequestsRunner:
    """Passes for independent requests, each with its own `KVCache`: encoding runs per request, and the
    canvases of a step's requests go through one decoder pass (see `TextBackbone.decode` with a list of
    caches)."""

    def __init__(self, model, soft_capped: bool):
        self.model, self.soft_capped = model, soft_capped
        self.canvas_length = model.config.canvas_length

    def new_cache(self) -> KVCache:
        return KVCache(self.model.config.text_config, self.canvas_length)

    def release(self, cache: KVCache) -> None:
        pass

    def encode(self, cache: KVCache, tokens: torch.Tensor, **images) -> None:
        """Appends `tokens` to `cache`; `images`: the model inputs of the images among them."""
        start = cache.get_seq_length()
        positions = torch.arange(start, start + tokens.shape[1], dtype=torch.int32, device=tokens.device)[None]
        with row_independent():
            self.model.model.encoder(input_ids=tokens, past_key_values=cache, position_ids=positions, **images)

    def commit(self, cache: KVCache, tokens: torch.Tensor) -> None:
        """Appends a committed canvas to `cache`."""
        self.encode(cache, tokens)

    def decode(self, caches: list[KVCache], current: torch.Tensor, self_conditioning_logits: list):
        """Scores [requests, canvas, vocab] for each request's canvas over its own cache (on the CPU as
        `RowScores`, made a request at a time); a request on the first step of its canvas gives None as its
        self-conditioning logits."""
        positions = torch.stack([torch.arange(c.get_seq_length(), c.get_seq_length() + self.canvas_length,
                                              dtype=torch.int32, device=current.device) for c in caches])
        with row_independent():
            hidden = self.model.model.decoder(decoder_input_ids=current, past_key_values=RequestCaches(caches),
                                              self_conditioning_logits=self_conditioning_logits,
                                              decoder_position_ids=positions).last_hidden_state
        head = self.model.logits if self.soft_capped else self.model.lm_head
        return RowScores(hidden, head) if current.device.type == "cpu" else head(hidden)


class Slot:
    """A request's row in a `SlotsRunner`; `index` moves when rows before it are freed."""

    def __init__(self, index: int):
        self.index = index


class SlotsRunner:
    """Passes for independent requests, each in a row of one preallocated cache (`graphs.SlotPasses`): the
    rows in use are always the first ones, so a step's pass runs over the smallest bucket of rows that holds
    them. A request may hold at most `capacity` tokens; `new_cache` takes a free row (there are `slots`)."""

    def __init__(self, model, slots: int, capacity: int, soft_capped: bool):
        self.soft_capped = soft_capped
        self.passes = SlotPasses(model, slots, capacity)
        self.taken: list[Slot] = []

    def new_cache(self) -> Slot:
        if len(self.taken) == self.passes.slots:
            raise RuntimeError(f"all {self.passes.slots} rows of the cache are taken")
        slot = Slot(len(self.taken))
        self.passes.clear(slot.index)
        self.taken.append(slot)
        return slot

    def release(self, slot: Slot) -> None:
        """Frees a request's row; the last row in use moves into it."""
        last = self.taken.pop()
        if last is not slot:
            self.passes.move(last.index, slot.index)
            last.index = slot.index
            self.taken[slot.index] = last

    def encode(self, slot: Slot, tokens: torch.Tensor, **images) -> None:
        self.passes.encode(slot.index, tokens, **images)

    def commit(self, slot: Slot, tokens: torch.Tensor) -> None:
        self.passes.commit(slot.index, tokens)

    def decode(self, slots: list[Slot], current: torch.Tensor, self_conditioning_logits: list) -> torch.Tensor:
        return self.passes.decode([slot.index for slot in slots], current, self_conditioning_logits,
                                  soft_capped=self.soft_capped)
