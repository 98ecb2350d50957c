"""Continuous batching for the server: many requests denoised side by side by one worker thread, on the
engine `generate` uses (`engine.state`, `engine.step`, `engine.runner`).

Each tick admits waiting requests (up to `max_batch` running at once), drops the cancelled ones, encodes
what the requests' caches lack, and runs one denoising step for every request that has a canvas: one
decoder pass for all their canvases, then one `denoise_step` over all their rows. A request whose canvas is
done commits it and either leaves or starts its next canvas at the next tick, so requests join and leave
between ticks, each with its own prefix length, settings and step counter. The passes run on the CPU (or
with `cuda_graphs=False`) eagerly over a cache per request (`RequestsRunner`); on CUDA over one
preallocated cache with a row per request, replaying a graph per bucket of rows (`SlotsRunner`), which
caps what a request may hold at `max_model_len` tokens.

Prompts are encoded in chunks of `prefill_chunk` tokens, at most one chunk per request per tick and at
most `prefill_budget` tokens per tick in all (a chunk that does not fit waits for the next tick), so a
long prompt delays the running requests by one chunk at a time, never by its whole length. Chunk
boundaries depend on the prompt alone; a committed canvas is one chunk. A prompt with images is encoded in
one piece, in a tick of its own budget: an image's tokens attend to each other in one pass.

Numbers. Every request is its own group in the step, with its own `torch.Generator`, drawn in `generate`'s
order (the canvas noise, then per step the samples and the renoising), and the decoder pass gives each row
what it gets alone (see `RequestsRunner`). So on the CPU a seeded request gives the same tokens alone or in
any batch; for the settings `generate` also has (not the filters, penalties and `min_tokens`, which only
the server takes), they are the tokens `generate` gives for its prompt after `torch.manual_seed(seed)`
with `batch_invariant=True` and `prefill_chunk_size` set to the server's chunk. On CUDA the token-wise products
are cuBLAS's, which may choose its kernel by row count: there a batch can move a token's last bits.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import signal
import threading
from dataclasses import astuple, dataclass, field
from typing import Callable

import torch

from ..distributed import runtime
from ..engine.generate import generation_settings, length_limits
from ..engine.graphs import captures
from ..engine.runner import RequestsRunner, SlotsRunner, decode_drawing_words
from ..engine.sampler import EntropyBoundSamplerConfig, SamplingFilters
from ..engine.state import Denoising, SamplingPlan
from ..engine.step import denoise_step
from ..engine.text import IncrementalDetokenizer, cut_at_end, eos_ids
from ..kernels import fused

logger = logging.getLogger(__name__)

# Upper bounds of the steps-per-canvas histogram that /metrics exports.
STEP_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 128, 256)
# The checkpoint's generation parameters a request may override.
TUNABLE = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold", "confidence_threshold")
# The most likely tokens a request may ask to see with each answer token.
MAX_TOP_LOGPROBS = 20
# Prompt tokens encoded per request per tick, and per tick in all.
PREFILL_CHUNK = 512
PREFILL_BUDGET = 1024
# Tokens a request may hold (prompt and answer) where every request's row of the cache is preallocated.
SLOT_CONTEXT = 16384
# Seconds an idle `Leader` lets pass between plans: its followers wait for the next one under the process
# group's timeout (`runtime.TIMEOUT`, minutes).
HEARTBEAT = 5.0


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
    # With `Settings.logprobs`: per answer token, (token, its log-probability, the most likely tokens and theirs).
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    # With `Request.raw`: the answer's text with its special tokens (where tool calls are written).
    raw: str | None = None


@dataclass
class Failed:
    message: str


@dataclass
class Settings:
    """One request's resolved generation settings.

    `temperature` scales both ends of the checkpoint's temperature schedule (t_min and t_max; a
    checkpoint without a schedule gets a constant temperature); 0 takes the most likely token at every
    position instead of sampling, with the schedule left as it is for acceptance and self-conditioning.
    `filters` (top_k, top_p, min_p) narrow what each position samples from, as `SamplingFilters` says.
    The answer ends at the checkpoint's end-of-sequence tokens (not with `ignore_eos`) and at
    `stop_token_ids`; none of those can be committed before `min_tokens` answer tokens. The penalties
    work on the committed tokens as `Penalties` says. With `logprobs` (0 to 20), each answer token comes
    with its log-probability, and that many of the most likely tokens with theirs, under the distribution
    the last step of its canvas computed, the one whose argmax was committed.
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
    filters: SamplingFilters = SamplingFilters()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None


def resolve_settings(model, prompt_tokens: int, max_tokens: int | None = None, temperature: float = 1.0,
                     stop: tuple[str, ...] = (), seed: int | None = None, top_k: int = 0, top_p: float = 1.0,
                     min_p: float = 0.0, stop_token_ids: tuple[int, ...] = (), ignore_eos: bool = False,
                     min_tokens: int = 0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                     repetition_penalty: float = 1.0, logprobs: int | None = None, max_model_len: int | None = None,
                     **tunable) -> Settings:
    """Settings from a request's values over the checkpoint's generation config; raises ValueError,
    naming the parameter, for a bad value or a prompt and answer longer than the model's positions or
    `max_model_len`."""
    unknown = sorted(set(tunable) - set(TUNABLE))
    if unknown:
        raise ValueError(f"unknown generation parameters: {unknown}")
    overrides = {name: value for name, value in tunable.items() if value is not None and name != "entropy_bound"}
    if tunable.get("entropy_bound") is not None:
        overrides["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=tunable["entropy_bound"])
    if max_tokens is not None:
        overrides["max_new_tokens"] = max_tokens
    config, _ = generation_settings(model, None, overrides)
    positions = model.config.text_config.max_position_embeddings
    limit = positions if max_model_len is None else min(positions, max_model_len)
    room = limit - prompt_tokens
    if max_tokens is None and room >= 1:
        # Left unset, the answer may take the checkpoint's length or whatever room the prompt leaves.
        config.max_new_tokens = min(config.max_new_tokens, room)
    try:
        length_limits(model, config, prompt_tokens)
    except ValueError as error:
        raise ValueError(f"`max_tokens` ({config.max_new_tokens}) is too large: {error}") from None
    if prompt_tokens + config.max_new_tokens > limit:
        raise ValueError(f"`max_tokens` ({config.max_new_tokens}) is too large: the prompt ({prompt_tokens} tokens) "
                         f"and the answer exceed this server's {limit} tokens per request")
    if config.stability_threshold is not None and config.stability_threshold > config.max_denoising_steps:
        # Stability is judged over a history of that many argmax canvases, which must fit in memory.
        raise ValueError(f"`stability_threshold` ({config.stability_threshold}) must not exceed "
                         f"`max_denoising_steps` ({config.max_denoising_steps})")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise ValueError(f"`temperature` must be a number from 0 to 2, got {temperature!r}")
    vocab = model.config.text_config.vocab_size
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in stop_token_ids):
        raise ValueError(f"`stop_token_ids` must be token ids below {vocab}, got {list(stop_token_ids)!r}")
    if not isinstance(ignore_eos, bool):
        raise ValueError(f"`ignore_eos` must be a boolean, got {ignore_eos!r}")
    if not (isinstance(min_tokens, int) and not isinstance(min_tokens, bool)
            and 0 <= min_tokens <= config.max_new_tokens):
        raise ValueError(f"`min_tokens` must be an integer from 0 to `max_tokens` ({config.max_new_tokens}), "
                         f"got {min_tokens!r}")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and -2 <= value <= 2):
            raise ValueError(f"`{name}` must be a number from -2 to 2, got {value!r}")
    if not (isinstance(repetition_penalty, (int, float)) and not isinstance(repetition_penalty, bool)
            and 0 < repetition_penalty <= 10):
        raise ValueError(f"`repetition_penalty` must be a number above 0 and at most 10, got {repetition_penalty!r}")
    if logprobs is not None and not (isinstance(logprobs, int) and not isinstance(logprobs, bool)
                                     and 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise ValueError(f"`logprobs` must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {logprobs!r}")
    scheduled = config.t_min is not None and config.t_max is not None
    adaptive = config.stability_threshold is not None and config.confidence_threshold is not None
    return Settings(max_tokens=config.max_new_tokens, max_denoising_steps=config.max_denoising_steps,
                    entropy_bound=config.sampler_config.entropy_bound,
                    t_min=config.t_min if scheduled else 1.0, t_max=config.t_max if scheduled else 1.0,
                    stability_threshold=config.stability_threshold if adaptive else None,
                    confidence_threshold=config.confidence_threshold if adaptive else None,
                    temperature=temperature, stop=tuple(stop), seed=seed,
                    filters=SamplingFilters(top_k=top_k, top_p=top_p, min_p=min_p),
                    stop_token_ids=tuple(stop_token_ids), ignore_eos=ignore_eos, min_tokens=min_tokens,
                    presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                    repetition_penalty=repetition_penalty, logprobs=logprobs)


@dataclass(eq=False)
class Request:
    """A prompt to answer. `emit` is called from the worker thread with Draft (only with `drafts`),
    Delta, and finally one Finished or Failed; once the worker sees `cancel`, which it looks at before
    each step, it is not called again."""

    prompt_ids: list[int]
    settings: Settings
    emit: Callable[[object], None]
    drafts: bool = False
    # The model inputs of the prompt's images (pixel_values, image_position_ids, mm_token_type_ids), if any.
    images: dict | None = None
    # Whether the outcome also gives the answer's text with its special tokens (`Finished.raw`).
    raw: bool = False
    cancelled: bool = field(default=False, init=False)

    def cancel(self) -> None:
        # A plain flag: the worker reads it between steps, and a late read costs one step at most.
        self.cancelled = True


class TooEarlyToEnd:
    """A logits processor: the canvas positions that would come before the answer's `min_tokens`th token
    cannot take a token that ends it. `answered()` says how many answer tokens earlier canvases committed."""

    def __init__(self, ends: list[int], min_tokens: int, answered: Callable[[], int]):
        self.ends, self.min_tokens, self.answered = ends, min_tokens, answered

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        early = self.min_tokens - self.answered()
        if early <= 0:
            return scores
        scores = scores.clone()
        scores[:, :early, self.ends] = float("-inf")
        return scores


class Penalties:
    """A logits processor with OpenAI's penalties over what is committed: every position's logit of a token
    the answer holds loses `presence_penalty`, and `frequency_penalty` times its count; a token of the prompt
    or the answer has a positive logit divided by `repetition_penalty` and a negative one multiplied by it.
    `answered()` gives the answer's committed tokens."""

    def __init__(self, settings: Settings, prompt_ids: list[int], answered: Callable[[], list[int]]):
        self.presence, self.frequency = settings.presence_penalty, settings.frequency_penalty
        self.repetition = settings.repetition_penalty
        self.prompt_ids, self.answered = prompt_ids, answered

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        vocab, device = scores.shape[-1], scores.device
        answer = torch.tensor(self.answered(), dtype=torch.long, device=device)
        counts = torch.bincount(answer, minlength=vocab).to(scores.dtype)
        scores = scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)
        if self.repetition != 1:
            seen = counts > 0
            seen[torch.tensor(self.prompt_ids, dtype=torch.long, device=device)] = True
            scores = torch.where(seen, torch.where(scores > 0, scores / self.repetition, scores * self.repetition),
                                 scores)
        return scores


class _Running:
    """A request being answered: its cache, its canvas (a group of one row, with its own generator), and
    the text sent so far."""

    def __init__(self, request: Request, runner: RequestsRunner, model, tokenizer, eos: set[int]):
        self.request, self.tokenizer = request, tokenizer
        settings = request.settings
        # The tokens that end this answer.
        self.eos = (set() if settings.ignore_eos else eos) | set(settings.stop_token_ids)
        device = model.device
        generator = torch.Generator(device=device)
        if settings.seed is None:
            generator.seed()
        else:
            generator.manual_seed(settings.seed)
        scale = settings.temperature if settings.temperature > 0 else 1.0
        plan = SamplingPlan.resolve(device, settings.max_denoising_steps, settings.t_min * scale,
                                    settings.t_max * scale, settings.entropy_bound, settings.stability_threshold,
                                    settings.confidence_threshold,
                                    "argmax" if settings.temperature == 0 else "multinomial",
                                    processors=self._processors(settings), filters=settings.filters)
        self.canvas = Denoising(plan, generator, 1, model.config.canvas_length, model.config.text_config.vocab_size,
                                device)
        self.uncached = torch.tensor([request.prompt_ids], device=device)
        self.committing = False  # whether `uncached` is a committed canvas
        self.images = {name: tensor.to(device) for name, tensor in request.images.items()} if request.images else None
        self.denoising = False
        self.text = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        self.sent = ""
        # Last: a row of a preallocated cache is taken only by a request that is sure to run.
        self.cache = runner.new_cache()

    def _processors(self, settings: Settings) -> tuple:
        processors = []
        if settings.presence_penalty or settings.frequency_penalty or settings.repetition_penalty != 1:
            processors.append(Penalties(settings, self.request.prompt_ids, lambda: self.text.tokens))
        if settings.min_tokens and self.eos:
            processors.append(TooEarlyToEnd(sorted(self.eos), settings.min_tokens, lambda: len(self.text.tokens)))
        return tuple((processor, False) for processor in processors)

    def encode_chunk(self, runner: RequestsRunner | SlotsRunner, chunk: int) -> int:
        """Encodes the next `chunk` tokens the cache lacks (a committed canvas in one piece); starts a canvas
        once none is left. Returns how many tokens it encoded."""
        tokens, self.uncached = self.uncached[:, :chunk], self.uncached[:, chunk:]
        if self.committing:
            runner.commit(self.cache, tokens)
            self.committing = False
        else:
            runner.encode(self.cache, tokens, **(self.images or {}))
        self.images = None
        if not self.uncached.shape[1]:
            self.canvas.start()
            self.denoising = True
        return tokens.shape[1]

    def stepped(self) -> tuple[int | None, Finished | None]:
        """After a step: the steps the canvas took when it is done (else None), and the outcome once the
        answer is done."""
        if self.request.drafts:
            self.request.emit(Draft(self.tokenizer.decode(self.canvas.argmax[0].tolist(), skip_special_tokens=True)))
        if not self.canvas.out_of_steps and not bool(self.canvas.finished.all()):
            return None, None
        self.denoising = False
        return self.canvas.taken, self._commit()

    def _commit(self) -> Finished | None:
        committed = cut_at_end(self.canvas.argmax[0].tolist(), self.eos)
        settings = self.request.settings
        if settings.logprobs is not None:
            self.logprobs.extend(self._logprobs(len(committed), settings.logprobs))
        self.text.add(committed)
        kept = self.text.tokens[:settings.max_tokens]
        text = self.text.text(settings.max_tokens)
        found = [(at, stop) for stop in settings.stop if (at := text.find(stop)) >= 0]
        reason = stop = None
        if found:
            at, stop = min(found)
            reason, text = "stop", text[:at]
        elif any(token in self.eos for token in kept):
            reason = "stop"
        elif len(self.text.tokens) >= settings.max_tokens:
            reason = "length"
        if reason is not None:
            self._send(text[len(self.sent):])
            logprobs = self.logprobs[:len(kept)] if settings.logprobs is not None else None
            raw = self.tokenizer.decode(kept, skip_special_tokens=False) if self.request.raw else None
            return Finished(text, reason, len(self.request.prompt_ids), len(kept), stop, logprobs, raw)
        # Whatever could begin a stop string waits too.
        safe = self.text.settled(settings.max_tokens)
        hold = max((len(s) - 1 for s in settings.stop), default=0)
        safe = safe[:len(safe) - hold] if hold else safe
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            self._send(safe[len(self.sent):])
        self.uncached, self.committing = self.canvas.argmax, True
        return None

    def _logprobs(self, count: int, top: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """For the canvas's first `count` committed tokens: each token's log-probability under the last step's
        processed logits, and the `top` most likely tokens with theirs."""
        logprobs = torch.log_softmax(self.canvas.self_conditioning_logits[0, :count].float(), dim=-1)
        tokens = self.canvas.argmax[0, :count]
        chosen = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
        best, best_ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], tokens[:, None][:, :0])
        return [(token, value, list(zip(ids, values)))
                for token, value, ids, values in zip(tokens.tolist(), chosen, best_ids.tolist(), best.tolist())]

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


@dataclass
class TickPlan:
    """The decisions a tick starts with: the requests it admits, in order, and the running requests it drops as
    cancelled (their places in `Scheduler.running`, which every process holds alike); or, with `stop`, that the
    worker ends."""

    admitted: list[Request] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    stop: bool = False


class Scheduler:
    """Owns the model for its worker thread; `submit` and `cancel` may be called from any thread."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, idle_wait: float = 0.5,
                 prefill_chunk: int = PREFILL_CHUNK, prefill_budget: int = PREFILL_BUDGET,
                 max_model_len: int | None = None, cuda_graphs: bool = True):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        if max_model_len is not None and (isinstance(max_model_len, bool) or not isinstance(max_model_len, int)
                                          or max_model_len < 2):
            # A request holds a prompt token and an answer token at least.
            raise ValueError(f"max_model_len must be an integer of at least 2, got {max_model_len!r}")
        if prefill_chunk < model.config.canvas_length or prefill_budget < prefill_chunk:
            # A committed canvas is encoded in one piece, as `generate` encodes it.
            raise ValueError(f"prefill_chunk must be at least the canvas length ({model.config.canvas_length}) and "
                             f"prefill_budget at least prefill_chunk, got {prefill_chunk} and {prefill_budget}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.idle_wait = max_batch, max_queue, idle_wait
        self.prefill_chunk, self.prefill_budget = prefill_chunk, prefill_budget
        self.eos = eos_ids(model.generation_config.eos_token_id)
        # Where the fused sampler runs, the runner hands it the LM head's scores to soft-cap itself.
        soft_capped = not fused.usable(model.device)
        # The most tokens a request may hold, prompt and answer: what `resolve_settings` needs to know.
        positions = model.config.text_config.max_position_embeddings
        self.max_model_len = positions if max_model_len is None else min(positions, max_model_len)
        if cuda_graphs and captures(model.device):
            if max_model_len is None:
                self.max_model_len = min(self.max_model_len, SLOT_CONTEXT)
            self.runner = SlotsRunner(model, max_batch, self.max_model_len, soft_capped)
        else:
            self.runner = RequestsRunner(model, soft_capped)
        self.metrics = Metrics()
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[_Running] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # An idle worker plans an empty tick this often (seconds); None: it waits for work however long it takes.
    heartbeat: float | None = None

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
        """Queues `request`; raises QueueFull when the queue is full, and ValueError for a request longer than
        `max_model_len` (which `resolve_settings` refuses given that limit)."""
        if len(request.prompt_ids) + request.settings.max_tokens > self.max_model_len:
            raise ValueError(f"the prompt ({len(request.prompt_ids)} tokens) and `max_tokens` "
                             f"({request.settings.max_tokens}) exceed this scheduler's {self.max_model_len} tokens")
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

    def _plan(self) -> TickPlan:
        """This process's decisions for the next tick: the waiting requests it admits (up to `max_batch` running
        at once) and the running ones it drops as cancelled; waits while there is nothing to do (with a
        `heartbeat`, at most that long, then plans an empty tick)."""
        with self._wake:
            waited = 0.0
            # Bounded waits keep the thread responsive to `stop` even if a notification were missed.
            while not self._stopping and not self.waiting and not self.running:
                if self.heartbeat is not None and waited >= self.heartbeat:
                    return TickPlan()
                self._wake.wait(self.idle_wait)
                waited += self.idle_wait
            if self._stopping:
                return TickPlan(stop=True)
            admitted = []
            while self.waiting and len(self.running) + len(admitted) < self.max_batch:
                request = self.waiting.popleft()
                if request.cancelled:
                    self._count("cancelled")
                else:
                    admitted.append(request)
        return TickPlan(admitted, [i for i, running in enumerate(self.running) if running.request.cancelled])

    def _share(self, plan: TickPlan) -> TickPlan:
        """The plan every process runs; in one process, `plan` itself (see `Leader`)."""
        return plan

    def _apply(self, plan: TickPlan) -> None:
        """Drops the plan's cancelled requests and starts its admitted ones."""
        for index in reversed(plan.cancelled):
            self._remove(self.running[index])
            self._count("cancelled")
        for request in plan.admitted:
            try:
                self.running.append(_Running(request, self.runner, self.model, self.tokenizer, self.eos))
            except Exception as error:  # one bad request must not stop the others
                self._fail(request, error)

    def _work(self) -> None:
        with torch.inference_mode():
            while not (plan := self._share(self._plan())).stop:
                self._apply(plan)
                self._tick()
        for request in [*self.waiting, *(running.request for running in self.running)]:
            self._fail(request, RuntimeError("the server is shutting down"))
        self.waiting.clear()
        self.running.clear()

    def _tick(self) -> None:
        """Encodes what the caches lack, within the tick's budget; then one denoising step for every request
        that has a canvas, in one decoder pass."""
        budget = self.prefill_budget
        for running in list(self.running):
            if not running.denoising:
                # A whole chunk or none: where a prompt is cut must not depend on what else runs. A prompt with
                # images is one piece, since an image's tokens attend to each other in one pass; it waits for a
                # tick of its own budget.
                if running.images is not None:
                    piece, fits = running.uncached.shape[1], budget == self.prefill_budget
                else:
                    piece = min(self.prefill_chunk, running.uncached.shape[1])
                    fits = piece <= budget
                if fits:
                    try:
                        budget -= running.encode_chunk(self.runner, piece)
                    except Exception as error:  # the failure belongs to this request alone
                        self._drop(running, error)
        # Requests that sample alike side by side share the sampler's vocabulary-sized work.
        batch = sorted((running for running in self.running if running.denoising),
                       key=lambda running: (running.canvas.plan.sampling, astuple(running.canvas.plan.filters)))
        with self.metrics.lock:
            self.metrics.step_batch_size = len(batch)
        if batch:
            groups = [running.canvas for running in batch]
            try:
                scores, words = decode_drawing_words(lambda: self._decode(batch), groups)
                denoise_step(groups, scores, self._dtype, self.model.config.text_config.final_logit_softcapping,
                             words=words, capped=self.runner.soft_capped)
            except Exception as error:  # the step was theirs together: every request in it fails
                for running in batch:
                    self._drop(running, error)
            else:
                with self.metrics.lock:
                    self.metrics.decoder_forwards += len(batch)
                    self.metrics.batched_steps += 1
                for running in batch:
                    self._update(running)
        if not self.running:
            with self.metrics.lock:
                self.metrics.step_batch_size = 0

    @property
    def _dtype(self) -> torch.dtype:
        return self.model.model.backbone.embed_tokens.weight.dtype

    def _decode(self, batch: list[_Running]) -> torch.Tensor:
        """Scores [requests, canvas, vocab], row r for `batch[r]` over its own cache."""
        return self.runner.decode([running.cache for running in batch],
                                  torch.cat([running.canvas.current for running in batch]),
                                  [running.canvas.self_conditioning_logits for running in batch])

    def _update(self, running: _Running) -> None:
        request = running.request
        try:
            steps, outcome = running.stepped()
            if steps is not None:
                self.metrics.canvas_done(steps)
            if outcome is not None:
                self._remove(running)
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
            self._remove(running)
        self._fail(running.request, error)

    def _remove(self, running: _Running) -> None:
        self.running.remove(running)
        self.runner.release(running.cache)

    def _fail(self, request: Request, error: BaseException) -> None:
        self._count("error")
        if not request.cancelled:
            # A listener that could not take the outcome cannot take the failure either; the worker goes on.
            with contextlib.suppress(Exception):
                request.emit(Failed(f"{type(error).__name__}: {error}"))

    def _count(self, outcome: str) -> None:
        with self.metrics.lock:
            self.metrics.finished[outcome] += 1


class Leader(Scheduler):
    """Rank 0's scheduler where the model is sharded over a torchrun job (`tp_plan`): it decides each tick as
    `Scheduler` does and hands the plan to the other ranks' `Follower`s, so that every rank makes the same model
    calls (hence the same collectives) in the same order with the same inputs. An unseeded request gets a seed
    drawn here, so that every rank's generator for it draws the same numbers. Idle, it sends an empty plan every
    `HEARTBEAT` seconds, well within the process group's timeout that the followers wait under. Should handing
    a plan over or a model call fail outside a request (a rank is gone), the process gets SIGTERM: the server
    stops instead of answering without its followers."""

    heartbeat = HEARTBEAT

    def _share(self, plan: TickPlan) -> TickPlan:
        for request in plan.admitted:
            if request.settings.seed is None:
                request.settings = dataclasses.replace(request.settings, seed=torch.Generator().seed())
        # What the model computes for a request follows from these; `drafts` and `raw` shape rank 0's events only.
        runtime.from_leader(([(request.prompt_ids, request.settings, request.images) for request in plan.admitted],
                             plan.cancelled, plan.stop))
        return plan

    def _work(self) -> None:
        try:
            super()._work()
        except Exception:
            logger.exception("the scheduler failed, and with it the ranks' lockstep; the server stops")
            os.kill(os.getpid(), signal.SIGTERM)


class Follower(Scheduler):
    """The scheduler of every rank but 0 where the model is sharded: `follow` runs, in the calling thread, the
    ticks rank 0's `Leader` plans, on this rank's shards, until rank 0 stops. It must be made with the leader's
    settings (`max_batch`, `prefill_chunk`, `prefill_budget`, `max_model_len`, `cuda_graphs`), which shape the
    ticks. Its requests' events go nowhere; it takes no `submit`."""

    def follow(self) -> None:
        self._work()

    def _plan(self) -> TickPlan:
        admitted, cancelled, stop = runtime.from_leader(None)
        return TickPlan([Request(ids, settings, _nowhere, images=images) for ids, settings, images in admitted],
                        cancelled, stop)


def _nowhere(event) -> None:
    """A follower's events: rank 0 alone answers."""
