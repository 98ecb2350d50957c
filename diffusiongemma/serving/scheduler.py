"""Continuous batching for the server: many requests denoised side by side by one worker thread.

Each scheduler tick admits waiting requests (up to `max_batch` running at once), drops the cancelled
ones, and then runs one denoising step for all running requests at once, in a single decoder pass. A
request that starts a canvas first encodes, on its own, what its cache lacks (the prompt, then its last
committed canvas); a request whose canvas is done commits it and either leaves or starts its next canvas
at the next tick. Requests therefore join and leave between ticks, each with its own prefix length,
settings and step counter, and a long request costs a short one a row in each pass, never its length.

How the pass is shared: the canvases, one row per request, go through the backbone's token-wise
operations together (embedding, self-conditioning MLP, norms, projections, dense MLP, router); attention
and the experts run per request inside each layer (`TextBackbone.decode` with a list of caches).
Attention reads each request's own cache: padding caches of different lengths to one would copy them on
every step, and the masked keys would change the kernel's summation order. The experts run per request
because `F.grouped_mm`'s bits depend on how many tokens each expert gets; the fused kernel that replaces
it on CUDA never sums across rows, so there they run once for all requests. The batched products give
each token the same bits whatever the number of rows (measured on the CPU, where every row count is a
multiple of the canvas length; a GPU library may pick another kernel for another row count). What is
vocabulary-sized runs per request: the self-conditioning signal's expected embedding, the LM head and
the sampler, because on the CPU one request's [canvas, vocabulary] tensor stays in cache and a batch's
does not (batching them made the step slower).

The sampler's half of the step works on the request's own logits: its temperature from its own step
counter, its acceptance, renoising and adaptive stopping, and every random number from its own
`torch.Generator`, drawn in `generate`'s order (the canvas noise, then per step the samples and the
renoising). So on the CPU a seeded request gives the same tokens alone or in any batch, the tokens
`generate` gives after `torch.manual_seed(seed)`. Prompts are encoded in one pass, not in chunks.
"""

from __future__ import annotations

import collections
import contextlib
import re
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..engine.generate import DenoisingState, draw_words_in_background
from ..engine.sampler import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
    samples_from_words,
)
from ..kernels import fused
from ..model.cache import KVCache

# Byte-fallback tokens, which the decoder joins with their neighbours into characters.
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Upper bounds of the steps-per-canvas histogram that /metrics exports.
STEP_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 128, 256)
# The only generation parameters a request may set besides its length, temperature, seed and stops.
TUNABLE = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold", "confidence_threshold")


class QueueFull(Exception):
    """Raised by `submit` when `max_queue` requests are already waiting."""


@dataclass
class Delta:
    """Committed text that follows what was sent before."""

    text: str


@dataclass
class Draft:
    """The current argmax of the canvas being denoised; the next draft or commit replaces it."""

    text: str


@dataclass
class Finished:
    """`text` is the whole answer; `finish_reason` is "stop" (end of sequence or a stop string) or
    "length"; `stop` is the stop string the text ended before, if one did."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    stop: str | None = None


@dataclass
class Failed:
    message: str


@dataclass
class Settings:
    """One request's resolved generation settings.

    `temperature` scales both ends of the checkpoint's temperature schedule (t_min and t_max; a
    checkpoint without a schedule gets a constant temperature); 0 takes the most likely token at every
    position instead of sampling, with the schedule left as it is for acceptance and self-conditioning.
    """

    max_tokens: int
    max_denoising_steps: int
    entropy_bound: float
    t_min: float
    t_max: float
    stability_threshold: int | None
    confidence_threshold: float | None
    temperature: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


def resolve_settings(model, prompt_tokens: int, max_tokens: int | None = None, temperature: float = 1.0,
                     stop: tuple[str, ...] = (), seed: int | None = None, **tunable) -> Settings:
    """Settings from a request's values over the checkpoint's generation config; raises ValueError,
    naming the parameter, for a bad value or a prompt and answer longer than the model's positions."""
    unknown = sorted(set(tunable) - set(TUNABLE))
    if unknown:
        raise ValueError(f"unknown generation parameters: {unknown}")
    overrides = {name: value for name, value in tunable.items() if value is not None and name != "entropy_bound"}
    if tunable.get("entropy_bound") is not None:
        overrides["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=tunable["entropy_bound"])
    if max_tokens is not None:
        overrides["max_new_tokens"] = max_tokens
    config, _ = model._generation_settings(None, overrides)
    room = model.config.text_config.max_position_embeddings - prompt_tokens
    if max_tokens is None and room >= 1:
        # Left unset, the answer may take the checkpoint's length or whatever room the prompt leaves.
        config.max_new_tokens = min(config.max_new_tokens, room)
    try:
        model._length_limits(config, prompt_tokens)
    except ValueError as error:
        raise ValueError(f"`max_tokens` ({config.max_new_tokens}) is too large: {error}") from None
    if config.stability_threshold is not None and config.stability_threshold > config.max_denoising_steps:
        # Stability is judged over a history of that many argmax canvases, which must fit in memory.
        raise ValueError(f"`stability_threshold` ({config.stability_threshold}) must not exceed "
                         f"`max_denoising_steps` ({config.max_denoising_steps})")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise ValueError(f"`temperature` must be a number from 0 to 2, got {temperature!r}")
    scheduled = config.t_min is not None and config.t_max is not None
    adaptive = config.stability_threshold is not None and config.confidence_threshold is not None
    return Settings(max_tokens=config.max_new_tokens, max_denoising_steps=config.max_denoising_steps,
                    entropy_bound=config.sampler_config.entropy_bound,
                    t_min=config.t_min if scheduled else 1.0, t_max=config.t_max if scheduled else 1.0,
                    stability_threshold=config.stability_threshold if adaptive else None,
                    confidence_threshold=config.confidence_threshold if adaptive else None,
                    temperature=temperature, stop=tuple(stop), seed=seed)


@dataclass(eq=False)
class Request:
    """A prompt to answer. `emit` is called from the worker thread with Draft (only with `drafts`),
    Delta, and finally one Finished or Failed; once the worker sees `cancel`, which it looks at before
    each step, it is not called again."""

    prompt_ids: list[int]
    settings: Settings
    emit: Callable[[object], None]
    drafts: bool = False
    cancelled: bool = field(default=False, init=False)

    def cancel(self) -> None:
        # A plain flag: the worker reads it between steps, and a late read costs one step at most.
        self.cancelled = True


class _Running:
    """A request being answered: its cache, its generator, and the canvas it is denoising."""

    def __init__(self, request: Request, model, tokenizer, eos: set[int]):
        self.request, self.model, self.tokenizer, self.eos = request, model, tokenizer, eos
        self.special_ids = set(getattr(tokenizer, "all_special_ids", ()))
        settings = request.settings
        self.device = model.device
        self.canvas_length = model.config.canvas_length
        self.generator = torch.Generator(device=self.device)
        if settings.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(settings.seed)
        self.sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(settings.entropy_bound), self.canvas_length,
                                           model.config.text_config.vocab_size, generator=self.generator)
        scale = settings.temperature if settings.temperature > 0 else 1.0
        self.schedule = LinearTemperatureScheduleLogitsProcessor(settings.t_min * scale, settings.t_max * scale,
                                                                 settings.max_denoising_steps)
        self.sampling = "argmax" if settings.temperature == 0 else "multinomial"
        self.fused_sampler = fused.usable(self.device)
        self.adaptive_stop = None
        if settings.stability_threshold is not None:
            self.adaptive_stop = StableAndConfidentStoppingCriteria(settings.stability_threshold,
                                                                    settings.confidence_threshold)
        self.cache = KVCache(model.config.text_config, self.canvas_length)
        self.uncached = torch.tensor([request.prompt_ids], device=self.device)
        # n = N..1 as views of one device tensor, as in `generate`: no copy to the device per step.
        self.step_numbers = torch.arange(settings.max_denoising_steps, 0, -1, dtype=torch.int32, device=self.device)
        self.generated: list[int] = []
        self.sent = ""
        self.step = 0  # steps left in the current canvas; 0 means no canvas is being denoised
        self.canvas: DenoisingState | None = None
        self.positions: torch.Tensor | None = None  # the canvas's positions, after the cached prefix

    def start_canvas(self) -> None:
        """Encodes what the cache lacks and draws the canvas's starting noise."""
        start = self.cache.get_seq_length()
        positions = torch.arange(start, start + self.uncached.shape[1], dtype=torch.int32, device=self.device)[None]
        self.model.model.encoder(input_ids=self.uncached, past_key_values=self.cache, position_ids=positions)
        start = self.cache.get_seq_length()
        self.positions = torch.arange(start, start + self.canvas_length, dtype=torch.int32, device=self.device)[None]
        noise = self.sampler.initialize_canvas(1, self.device)
        self.canvas = DenoisingState(current=noise, argmax=noise, self_conditioning_logits=None,
                                     finished=torch.zeros(1, dtype=torch.bool, device=self.device))
        self.step = self.request.settings.max_denoising_steps
        if self.adaptive_stop is not None:
            self.adaptive_stop.reset()

    def draw_words(self) -> Future | None:
        """Starts drawing this step's multinomial words while the decoder runs; only this request draws from
        its generator, so nothing can come in between."""
        if self.sampling != "multinomial" or self.fused_sampler or not samples_from_words(self.device):
            return None
        return draw_words_in_background((self.canvas_length, self.sampler.vocab_size), self.generator)

    def update(self, hidden: torch.Tensor, words: Future | None = None) -> tuple[int | None, Finished | None]:
        """The rest of the step, `generate`'s, from this request's row of the decoder's output [1, canvas,
        hidden]: the LM head, then the sampler. Returns the steps the canvas took when this step committed
        it (else None), and the outcome once the answer is done."""
        step = self.step_numbers[self.request.settings.max_denoising_steps - self.step]
        scores = self.model.lm_head(hidden) if self.fused_sampler else self.model.logits(hidden)
        self.model._update_canvas(self.canvas, scores, step, self.uncached, self.sampler,
                                  [(self.schedule, True)], self.adaptive_stop, self.sampling,
                                  words.result() if words is not None else None, self.fused_sampler)
        stopped = bool(self.canvas.finished.all())
        if self.request.drafts:
            self.request.emit(Draft(self.tokenizer.decode(self.canvas.argmax[0].tolist(), skip_special_tokens=True)))
        self.step -= 1
        if not stopped and self.step > 0:
            return None, None
        steps = self.request.settings.max_denoising_steps - self.step
        self.step = 0
        return steps, self._commit()

    def _commit(self) -> Finished | None:
        canvas = self.canvas.argmax[0].tolist()
        end = next((i for i, token in enumerate(canvas) if token in self.eos), None)
        self.generated.extend(canvas if end is None else canvas[:end + 1])
        settings = self.request.settings
        kept = self.generated[:settings.max_tokens]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        found = [(at, stop) for stop in settings.stop if (at := text.find(stop)) >= 0]
        reason = stop = None
        if found:
            at, stop = min(found)
            reason, text = "stop", text[:at]
        elif any(token in self.eos for token in kept):
            reason = "stop"
        elif len(self.generated) >= settings.max_tokens:
            reason = "length"
        if reason is not None:
            self._send(text[len(self.sent):])
            return Finished(text, reason, len(self.request.prompt_ids), len(kept), stop)
        # The decoder reads a run of byte tokens (and the special tokens it skips) as one piece, so text
        # that ends in one may still change; it waits, and so does whatever could begin a stop string.
        settled = len(kept)
        while settled and self._open_ended(kept[settled - 1]):
            settled -= 1
        safe = text if settled == len(kept) else self.tokenizer.decode(kept[:settled], skip_special_tokens=True)
        hold = max((len(s) - 1 for s in settings.stop), default=0)
        safe = safe[:len(safe) - hold] if hold else safe
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            self._send(safe[len(self.sent):])
        self.uncached = self.canvas.argmax
        return None

    def _open_ended(self, token: int) -> bool:
        piece = self.tokenizer.convert_ids_to_tokens(token) or ""
        return token in self.special_ids or BYTE_TOKEN.fullmatch(piece) is not None

    def _send(self, text: str) -> None:
        if text:
            self.sent += text
            self.request.emit(Delta(text))


class Metrics:
    """Counters the worker updates and /metrics reads; all access goes through `lock`."""

    def __init__(self):
        self.lock = threading.Lock()
        self.finished = collections.Counter()  # by outcome: stop, length, cancelled, error
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.decoder_forwards = 0  # request steps: one per row of each batched pass
        self.batched_steps = 0  # decoder passes
        self.step_batch_size = 0  # rows of the last pass while requests run; 0 when idle
        self.step_buckets = [0] * len(STEP_BUCKETS)
        self.canvases = 0
        self.steps = 0

    def canvas_done(self, steps: int) -> None:
        with self.lock:
            self.canvases += 1
            self.steps += steps
            for i, bound in enumerate(STEP_BUCKETS):
                if steps <= bound:
                    self.step_buckets[i] += 1


class Scheduler:
    """Owns the model for its worker thread; `submit` and `cancel` may be called from any thread."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, idle_wait: float = 0.5):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.idle_wait = max_batch, max_queue, idle_wait
        eos = model.generation_config.eos_token_id
        self.eos = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
        self.metrics = Metrics()
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[_Running] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="diffusiongemma-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the worker after its current step; requests still waiting or running fail."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request) -> None:
        with self._wake:
            if self._stopping:
                raise RuntimeError("the scheduler has stopped")
            # Requests that free batch slots will take at the next tick do not count as queued.
            if len(self.waiting) >= self.max_queue + max(self.max_batch - len(self.running), 0):
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """Cancels `request`; one still waiting leaves the queue at once, so that its place is free."""
        request.cancel()
        with self._wake:
            if request not in self.waiting:
                return  # the worker drops it (running) or never sees it again (done)
            self.waiting.remove(request)
        self._count("cancelled")

    def _admit(self) -> bool:
        """Moves waiting requests into the batch; False once the scheduler is stopping."""
        with self._wake:
            # Bounded waits keep the thread responsive to `stop` even if a notification were missed.
            while not self._stopping and not self.waiting and not self.running:
                self._wake.wait(self.idle_wait)
            if self._stopping:
                return False
            while self.waiting and len(self.running) < self.max_batch:
                request = self.waiting.popleft()
                if request.cancelled:
                    self._count("cancelled")
                    continue
                try:
                    self.running.append(_Running(request, self.model, self.tokenizer, self.eos))
                except Exception as error:  # one bad request must not stop the others
                    self._fail(request, error)
        return True

    def _work(self) -> None:
        with torch.inference_mode():
            while self._admit():
                self._tick()
        for request in [*self.waiting, *(running.request for running in self.running)]:
            self._fail(request, RuntimeError("the server is shutting down"))
        self.waiting.clear()
        self.running.clear()

    def _tick(self) -> None:
        """One denoising step for every running request, in one decoder pass."""
        batch = [running for running in list(self.running) if self._ready(running)]
        with self.metrics.lock:
            self.metrics.step_batch_size = len(batch)
        if batch:
            words = [running.draw_words() for running in batch]
            try:
                hidden = self._decode(batch)
            except Exception as error:  # the pass was theirs together: every request in it fails
                for running in batch:
                    self._drop(running, error)
            else:
                with self.metrics.lock:
                    self.metrics.decoder_forwards += len(batch)
                    self.metrics.batched_steps += 1
                for row, running in enumerate(batch):
                    self._update(running, hidden[row:row + 1], words[row])
        if not self.running:
            with self.metrics.lock:
                self.metrics.step_batch_size = 0

    def _ready(self, running: _Running) -> bool:
        """Drops a cancelled request; starts a canvas for one that needs it. True if it takes this step."""
        if running.request.cancelled:
            self.running.remove(running)
            self._count("cancelled")
            return False
        if running.step == 0:
            try:
                running.start_canvas()
            except Exception as error:  # the failure belongs to this request alone
                self._drop(running, error)
                return False
        return True

    def _decode(self, batch: list[_Running]) -> torch.Tensor:
        """The decoder's last hidden states [requests, canvas, hidden], row r for `batch[r]` over its own cache."""
        return self.model.model.decoder(
            decoder_input_ids=torch.cat([running.canvas.current for running in batch]),
            past_key_values=[running.cache for running in batch],
            self_conditioning_logits=[running.canvas.self_conditioning_logits for running in batch],
            decoder_position_ids=torch.cat([running.positions for running in batch])).last_hidden_state

    def _update(self, running: _Running, hidden: torch.Tensor, words: Future | None) -> None:
        request = running.request
        try:
            steps, outcome = running.update(hidden, words)
            if steps is not None:
                self.metrics.canvas_done(steps)
            if outcome is not None:
                self.running.remove(running)
                with self.metrics.lock:
                    self.metrics.finished[outcome.finish_reason] += 1
                    self.metrics.prompt_tokens += outcome.prompt_tokens
                    self.metrics.generated_tokens += outcome.completion_tokens
                if not request.cancelled:
                    request.emit(outcome)
        except Exception as error:  # the failure belongs to this request alone
            self._drop(running, error)

    def _drop(self, running: _Running, error: BaseException) -> None:
        if running in self.running:
            self.running.remove(running)
        self._fail(running.request, error)

    def _fail(self, request: Request, error: BaseException) -> None:
        self._count("error")
        if not request.cancelled:
            # A listener that could not take the outcome cannot take the failure either; the worker goes on.
            with contextlib.suppress(Exception):
                request.emit(Failed(f"{type(error).__name__}: {error}"))

    def _count(self, outcome: str) -> None:
        with self.metrics.lock:
            self.metrics.finished[outcome] += 1
