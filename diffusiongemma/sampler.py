"""The denoising sampler: temperature schedule, entropy-bound acceptance, renoising, adaptive stopping.

The default path draws random numbers in the reference's order (one canvas `randint`, then per step one
`multinomial` and one renoising `randint`) and computes every float the same way, so the same seed
gives the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last axis, computed like a categorical distribution does
    (normalised log-probabilities, clamped at the dtype's minimum), so ties and sums match the reference."""
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(log_probs, dim=-1)
    log_probs = torch.clamp(log_probs, min=torch.finfo(log_probs.dtype).min)
    return -(log_probs * probs).sum(-1)


SAMPLING = ("multinomial", "inverse_cdf", "argmax")


def sample_tokens(probs: torch.Tensor, method: str = "multinomial",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per position from probs [..., vocab].

    "multinomial" is `torch.multinomial`, whose random stream the reference uses (same seed, same
    tokens); on the CPU it draws an exponential variate for every vocabulary entry. "inverse_cdf" draws
    one uniform per position and inverts the cumulative distribution: the same distribution, other
    random numbers, a fraction of the cost. "argmax" takes the most likely token.
    """
    flat = probs.reshape(-1, probs.shape[-1])
    if method == "inverse_cdf":
        cumulative = flat.cumsum(dim=-1)
        targets = torch.rand(flat.shape[0], 1, device=flat.device, dtype=cumulative.dtype, generator=generator)
        tokens = torch.searchsorted(cumulative, targets * cumulative[:, -1:], right=True)
        tokens = tokens.clamp_(max=flat.shape[-1] - 1)
    elif method == "argmax":
        tokens = flat.argmax(dim=-1, keepdim=True)
    else:
        tokens = torch.multinomial(flat, num_samples=1, generator=generator)
    return tokens.view(probs.shape[:-1])


@dataclass
class EntropyBoundSamplerConfig:
    """`entropy_bound`: how much summed entropy the tokens accepted in one step may carry; higher
    accepts more tokens per step."""

    entropy_bound: float

    def __post_init__(self) -> None:
        if not _is_number(self.entropy_bound) or self.entropy_bound <= 0:
            raise ValueError(f"`entropy_bound` must be a number > 0, got {self.entropy_bound!r}")

    def to_dict(self) -> dict:
        # The class name travels with the values so that generation_config.json can be read back.
        return {"entropy_bound": self.entropy_bound, "_cls_name": type(self).__name__}


class LinearTemperatureScheduleLogitsProcessor:
    """Divides logits by t = t_min + (t_max - t_min) * n / N, where n counts the remaining steps (N..1)."""

    def __init__(self, t_min: float, t_max: float, max_denoising_steps: int):
        self.t_min = t_min
        self.t_max = t_max
        self.max_denoising_steps = max_denoising_steps

    def temperature(self, cur_step: torch.Tensor) -> torch.Tensor:
        # `cur_step` is an int32 tensor: the temperature is then a float32 tensor, as in the reference.
        return self.t_min + (self.t_max - self.t_min) * (cur_step / self.max_denoising_steps)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, cur_step: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature(cur_step)


class EntropyBoundSampler:
    """Starts a canvas from uniform noise, accepts the lowest-entropy tokens whose summed entropy stays
    within the bound, and puts fresh noise everywhere else."""

    def __init__(self, config: EntropyBoundSamplerConfig, canvas_length: int, vocab_size: int,
                 max_denoising_steps: int | None = None, generator: torch.Generator | None = None):
        self.entropy_bound = config.entropy_bound
        self.canvas_length = canvas_length
        self.vocab_size = vocab_size
        # None draws from torch's global generator, as the reference does.
        self.generator = generator
        self.accepted_token_mask: torch.Tensor | None = None

    def initialize_canvas(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        return torch.randint(0, self.vocab_size, (batch_size, self.canvas_length), device=device,
                             generator=self.generator)

    def accept_canvas(self, current_canvas: torch.Tensor, denoiser_canvas: torch.Tensor, logits: torch.Tensor,
                      cur_step=None, entropy: torch.Tensor | None = None) -> torch.Tensor:
        """Takes the denoiser's token at the accepted positions: sorted by entropy, a position is accepted
        while the entropy summed over the positions before it stays within the bound (so the
        lowest-entropy one always is)."""
        if entropy is None:
            entropy = token_entropy(logits)
        sorted_entropy, order = torch.sort(entropy, dim=-1)
        accepted_sorted = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= self.entropy_bound
        self.accepted_token_mask = torch.zeros_like(accepted_sorted).scatter(-1, order, accepted_sorted)
        return torch.where(self.accepted_token_mask, denoiser_canvas, current_canvas)

    def renoise_canvas(self, accepted_canvas: torch.Tensor, cur_step=None) -> torch.Tensor:
        noise = self.initialize_canvas(accepted_canvas.shape[0], accepted_canvas.device)
        return torch.where(self.accepted_token_mask, accepted_canvas, noise)


class StableAndConfidentStoppingCriteria:
    """A row stops denoising once its argmax canvas has not changed for `stability_threshold` steps and
    the mean entropy of its (temperature-scaled) logits is below `confidence_threshold`."""

    def __init__(self, stability_threshold: int, confidence_threshold: float):
        self.stability_threshold = stability_threshold
        self.confidence_threshold = confidence_threshold
        self.argmax_canvas_history: torch.Tensor | None = None

    def reset(self) -> None:
        self.argmax_canvas_history = None

    def __call__(self, argmax_canvas: torch.Tensor, logits: torch.Tensor,
                 entropy: torch.Tensor | None = None) -> torch.Tensor:
        if self.stability_threshold == 0:
            stable = torch.ones(argmax_canvas.shape[0], dtype=torch.bool, device=argmax_canvas.device)
        else:
            if self.argmax_canvas_history is None:
                # -1 is no token id, so nothing is stable before `stability_threshold` steps were seen.
                self.argmax_canvas_history = torch.full((self.stability_threshold, *argmax_canvas.shape), -1,
                                                        dtype=argmax_canvas.dtype, device=argmax_canvas.device)
            stable = (self.argmax_canvas_history == argmax_canvas[None]).all(dim=-1).all(dim=0)
            self.argmax_canvas_history = torch.cat([self.argmax_canvas_history[1:], argmax_canvas[None]])
        if entropy is None:
            entropy = token_entropy(logits)
        return stable & (entropy.mean(dim=-1) < self.confidence_threshold)
