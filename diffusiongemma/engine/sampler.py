"""The denoising sampler: temperature schedule, entropy-bound acceptance, renoising, adaptive stopping.

The default path draws random numbers in the reference's order (one canvas `randint`, then per step one
`multinomial` and one renoising `randint`) and computes every float the same way, so the same seed
gives the same tokens.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last axis, computed like a categorical distribution does
    (normalised log-probabilities, clamped at the dtype's minimum), so ties and sums match the reference."""
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(log_probs, dim=-1)
    # In place: the same operations without two more vocabulary-sized temporaries.
    return -log_probs.clamp_(min=torch.finfo(log_probs.dtype).min).mul_(probs).sum(-1)


SAMPLING = ("multinomial", "inverse_cdf", "argmax")

# torch.multinomial(probs, 1) on the CPU takes one 64-bit word w from the generator for every entry, in
# row-major order, turns it into the exponential variate q = float32(-log1p(-u)) with
# u = (w mod 2^53) / 2^53, and returns the first argmax of probs / q. As -log1p(-u) >= u, probs / u bounds
# each entry's ratio from above: only entries whose bound reaches the exact ratio of the bound's own
# argmax can win, and only those need the logarithm. The words, the floats compared and the token are
# the reference's; drawing a word costs a fraction of drawing a variate, and the words do not depend on
# the probabilities, so they can be drawn before the logits exist (`draw_multinomial_words`).
# Covers the float32 roundings in the bound and in q (under 2^-20 relative in all).
_BOUND_SLACK = 1 + 2.0 ** -18
# How many of a row's largest bounds are looked at before searching the whole row for candidates.
_TOP_BOUNDS = 8


@dataclass
class MultinomialWords:
    """What one `torch.multinomial` call on probabilities of `words.shape` would draw: each word's low 53
    bits (all the kernel uses of it), and the generator's state before the draw (to let torch redo it in
    the cases only torch can answer)."""

    words: torch.Tensor
    generator: torch.Generator
    state_before: torch.Tensor


def draw_multinomial_words(shape: tuple[int, ...], generator: torch.Generator | None = None) -> MultinomialWords:
    """Only the draw, a serial kernel: run on a second thread, it must not start a second team of
    intra-op threads beside the decoder's."""
    generator = generator if generator is not None else torch.default_generator
    state = generator.get_state()
    # A range wider than 32 bits takes one 64-bit word per entry, as the exponential kernel does, and a
    # range of 2^53 keeps exactly the bits it uses.
    words = torch.empty(shape, dtype=torch.int64).random_(0, 2 ** 53, generator=generator)
    return MultinomialWords(words, generator, state)


def _exponential_variates(words: list[int]) -> torch.Tensor:
    """The variates torch's CPU kernel makes from these words: libm's log1p in double (math.log1p is that
    same function; torch's vectorized log1p is not), rounded to float32."""
    return torch.tensor([-math.log1p(-(w * 2.0 ** -53)) for w in words], dtype=torch.float64).to(torch.float32)


def _exact_ratios(probs: torch.Tensor, words: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return probs[rows, cols] / _exponential_variates(words[rows, cols].tolist())


def multinomial_from_words(probs: torch.Tensor, drawn: MultinomialWords) -> torch.Tensor | None:
    """torch.multinomial(probs, 1)[:, 0] for 2-D float32 probs, from its words; None where only torch's
    kernel gives its answer (a zero variate, probabilities that are not finite)."""
    words = drawn.words
    # A zero u gives a bound that wins and a ratio that is not finite: the case handed back to torch.
    uniform = words.to(torch.float32)
    bound = torch.div(probs, uniform, out=uniform).mul_(2.0 ** 53 * _BOUND_SLACK)
    # The top bounds usually hold every candidate and cost one pass, as an argmax would.
    top_bounds, top_cols = bound.topk(min(_TOP_BOUNDS, probs.shape[1]), dim=-1)
    rows = torch.arange(probs.shape[0])
    threshold = _exact_ratios(probs, words, rows, top_cols[:, 0])
    if not bool(torch.isfinite(threshold).all()):
        return None
    if bool((top_bounds[:, -1] >= threshold).any()):
        rows, cols = (bound >= threshold[:, None]).nonzero(as_tuple=True)
    else:
        keep = top_bounds >= threshold[:, None]
        rows, cols = rows[:, None].expand_as(top_cols)[keep], top_cols[keep]
    ratios = _exact_ratios(probs, words, rows, cols)
    best = threshold.scatter_reduce(0, rows, ratios, "amax")
    # The first of the best, as argmax picks; every row has a candidate: its top bound.
    candidates = torch.where(ratios == best[rows], cols, probs.shape[1])
    return top_cols[:, 0].scatter_reduce(0, rows, candidates, "amin", include_self=False)


@functools.cache
def words_reproduce_multinomial() -> bool:
    """Whether this torch build draws multinomial samples as `multinomial_from_words` assumes: checked
    once per process on the variates themselves, on samples and on the generator's state afterwards.
    Where it does not, the exact path stays on `torch.multinomial`."""
    seed = 20261127
    probs = torch.softmax(torch.randn(16, 4096, generator=torch.Generator().manual_seed(seed)) * 4, dim=-1)
    reference, ours = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    variates = torch.empty(4096).exponential_(generator=reference)
    if not torch.equal(_exponential_variates(draw_multinomial_words((4096,), ours).words.tolist()), variates):
        return False
    expected = torch.multinomial(probs, 1, generator=reference)[:, 0]
    tokens = multinomial_from_words(probs, draw_multinomial_words(tuple(probs.shape), ours))
    return tokens is not None and torch.equal(tokens, expected) and torch.equal(reference.get_state(),
                                                                                  ours.get_state())


def samples_from_words(device: torch.device) -> bool:
    """Whether the default sampling on `device` can take words drawn before the logits exist."""
    return device.type == "cpu" and words_reproduce_multinomial()


def sample_tokens(probs: torch.Tensor, method: str = "multinomial", generator: torch.Generator | None = None,
                  words: MultinomialWords | None = None) -> torch.Tensor:
    """One token per position from probs [..., vocab].

    "multinomial" gives `torch.multinomial`'s tokens from its random stream, so the reference's seed gives
    the reference's tokens; on the CPU it goes through the words (see `multinomial_from_words`), which may
    have been drawn ahead. "inverse_cdf" draws one uniform per position and inverts the cumulative
    distribution: the same distribution, other random numbers, a fraction of the cost. "argmax" takes the
    most likely token.
    """
    flat = probs.reshape(-1, probs.shape[-1])
    if method == "inverse_cdf":
        cumulative = flat.cumsum(dim=-1)
        targets = torch.rand(flat.shape[0], 1, device=flat.device, dtype=cumulative.dtype, generator=generator)
        tokens = torch.searchsorted(cumulative, targets * cumulative[:, -1:], right=True)
        return tokens.clamp_(max=flat.shape[-1] - 1).view(probs.shape[:-1])
    if method == "argmax":
        return flat.argmax(dim=-1).view(probs.shape[:-1])
    if words is None and flat.dtype == torch.float32 and samples_from_words(flat.device):
        words = draw_multinomial_words(tuple(flat.shape), generator)
    tokens = multinomial_from_words(flat, words) if words is not None else None
    if tokens is None:
        if words is not None:
            words.generator.set_state(words.state_before)
            generator = words.generator
        tokens = torch.multinomial(flat, num_samples=1, generator=generator)
    return tokens.view(probs.shape[:-1])


@dataclass(frozen=True)
class SamplingFilters:
    """Which tokens a position may be sampled from: its `top_k` most likely (0: all), the fewest most likely
    whose probabilities add up to `top_p` (1: all), and those at least `min_p` times as likely as the most
    likely one (0: all). The argmax, the entropies and the self-conditioning input still come from the whole
    distribution, so acceptance and stopping are those of the unfiltered step."""

    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
            raise ValueError(f"`top_k` must be an integer >= 0 (0: no limit), got {self.top_k!r}")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"`top_p` must be a number above 0 and at most 1, got {self.top_p!r}")
        if not (_is_number(self.min_p) and 0 <= self.min_p < 1):
            raise ValueError(f"`min_p` must be a number from 0 to below 1, got {self.min_p!r}")

    @property
    def active(self) -> bool:
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [..., vocab] with the filtered-out tokens set to zero (the kept ones keep their values:
        sampling in proportion to them is sampling the renormalised distribution)."""
        keep = torch.ones_like(probs, dtype=torch.bool)
        if self.top_k > 0 and self.top_k < probs.shape[-1]:
            kth = probs.topk(self.top_k, dim=-1).values[..., -1:]
            keep &= probs >= kth
        if self.top_p < 1:
            ordered, order = probs.sort(dim=-1, descending=True)
            # A token is kept while the mass before it is short of top_p, so the most likely always is.
            before = ordered.cumsum(dim=-1) - ordered
            keep &= torch.zeros_like(keep).scatter(-1, order, before < self.top_p * ordered.sum(-1, keepdim=True))
        if self.min_p > 0:
            keep &= probs >= self.min_p * probs.amax(dim=-1, keepdim=True)
        return torch.where(keep, probs, 0.0)


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


def entropy_bound_acceptance(entropy: torch.Tensor, bound: float | torch.Tensor) -> torch.Tensor:
    """Which positions of entropy [..., canvas] are accepted: sorted by entropy, a position is accepted
    while the entropy summed over the positions before it stays within `bound` (a number, or a float32
    tensor broadcast against [..., 1]), so the lowest-entropy one always is."""
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    accepted_sorted = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= bound
    return torch.zeros_like(accepted_sorted).scatter(-1, order, accepted_sorted)


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
        self.accepted_token_mask = entropy_bound_acceptance(entropy, self.entropy_bound)
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
