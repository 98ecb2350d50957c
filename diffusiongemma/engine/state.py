"""What the engine holds for a request: its sampling plan, resolved once, and the canvas it is denoising.

A `Denoising` is a group of canvas rows that share one plan and one random generator. `generate` makes one
for all the rows of its batch, so that random numbers are drawn over the whole batch in the reference's
order; the server makes one per request, each with its own generator, so that a request's numbers do not
depend on what else runs beside it. `step.denoise_step` advances any number of them in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import fused
from .sampler import (
    LinearTemperatureScheduleLogitsProcessor,
    SamplingFilters,
    StableAndConfidentStoppingCriteria,
    samples_from_words,
)


@dataclass
class SamplingPlan:
    """How every step of a request samples, decided once from its settings and device.

    `processors`: the caller's logits processors, each with whether it takes the step (generate only);
    `schedule`: the temperature schedule, or None for none; `sampling`: "multinomial" (the reference's),
    "inverse_cdf" or "argmax"; `fused`: the vocabulary-sized work runs as one kernel (`fused.denoise`),
    which then also soft-caps the LM head's scores; `draw_ahead`: multinomial words are drawn while the
    decoder runs; stopping: with both thresholds set, a row stops once it is stable and confident;
    `filters`: which tokens a position may be sampled from (`sampler.SamplingFilters`)."""

    steps: int
    schedule: LinearTemperatureScheduleLogitsProcessor | None
    processors: tuple
    sampling: str
    fused: bool
    draw_ahead: bool
    entropy_bound: float
    stability_threshold: int | None
    confidence_threshold: float | None
    filters: SamplingFilters = SamplingFilters()

    @classmethod
    def resolve(cls, device: torch.device, steps: int, t_min: float | None, t_max: float | None,
                entropy_bound: float, stability_threshold: int | None, confidence_threshold: float | None,
                sampling: str = "multinomial", fused_sampler: bool = True, processors=(),
                filters: SamplingFilters = SamplingFilters()) -> SamplingPlan:
        schedule = None
        if t_min is not None and t_max is not None:
            schedule = LinearTemperatureScheduleLogitsProcessor(t_min, t_max, steps)
        if stability_threshold is None or confidence_threshold is None:
            stability_threshold = confidence_threshold = None
        # The fused kernel knows one processor, the temperature schedule, and no filters; a processor of the
        # caller's might also draw random numbers itself, and the words must then be drawn after it, in the
        # reference's order.
        fused_sampler = fused_sampler and not processors and not filters.active and fused.usable(device)
        draw_ahead = not fused_sampler and sampling == "multinomial" and not processors and samples_from_words(device)
        return cls(steps, schedule, tuple(processors), sampling, fused_sampler, draw_ahead, entropy_bound,
                   stability_threshold, confidence_threshold, filters)

    @property
    def adaptive(self) -> bool:
        return self.stability_threshold is not None


class Denoising:
    """One group's canvas while it is denoised: the current tokens, the argmax draft, the self-conditioning
    logits (the last step's processed logits) and which rows stopped, plus the step counter."""

    def __init__(self, plan: SamplingPlan, generator: torch.Generator | None, rows: int, canvas_length: int,
                 vocab_size: int, device: torch.device):
        self.plan, self.generator = plan, generator
        self.rows, self.canvas_length, self.vocab_size, self.device = rows, canvas_length, vocab_size, device
        # n = N..1 as views of one device tensor: a tensor made per step is a copy to the device, which
        # waits for the work queued there.
        self.step_numbers = torch.arange(plan.steps, 0, -1, dtype=torch.int32, device=device)
        self.stop = None
        if plan.adaptive:
            self.stop = StableAndConfidentStoppingCriteria(plan.stability_threshold, plan.confidence_threshold)
        self.current = self.argmax = self.self_conditioning_logits = self.finished = None
        self.taken = 0

    def noise(self, rows: int | None = None) -> torch.Tensor:
        """Uniform random tokens for `rows` canvases (all of the group's by default), from its generator."""
        return torch.randint(0, self.vocab_size, (self.rows if rows is None else rows, self.canvas_length),
                             device=self.device, generator=self.generator)

    def start(self, canvas: torch.Tensor | None = None, self_conditioning_logits: torch.Tensor | None = None) -> None:
        """A new canvas: noise, or `canvas` given by the caller (the reference draws the noise even then)."""
        noise = self.noise()
        self.current = self.argmax = noise if canvas is None else canvas
        self.self_conditioning_logits = self_conditioning_logits
        self.finished = torch.zeros(self.rows, dtype=torch.bool, device=self.device)
        self.taken = 0
        if self.stop is not None:
            self.stop.reset()

    @property
    def step(self) -> torch.Tensor:
        """n of the coming step, a 0-d int32 tensor."""
        return self.step_numbers[self.taken]

    def temperature(self) -> torch.Tensor | None:
        return self.plan.schedule.temperature(self.step) if self.plan.schedule is not None else None

    @property
    def out_of_steps(self) -> bool:
        return self.taken >= self.plan.steps
