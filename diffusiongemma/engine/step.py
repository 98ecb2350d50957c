"""The sampler's half of a denoising step, for any number of groups (`state.Denoising`) in one batch.

Given the decoder's scores for every row of every group, one step: divides the logits by each group's
temperature (n counts down from N to 1), samples every position, takes the argmax and the entropies,
accepts the lowest-entropy positions within each group's entropy bound, puts fresh noise everywhere else,
judges each group's adaptive stopping, and keeps the processed logits as the next step's self-conditioning
input. What is vocabulary-sized runs once over all rows that sample alike (or, for `RowScores`, over blocks
of them that stay in the CPU's cache); what draws random numbers runs per group, from its own generator and
in the reference's order (the samples, then the renoising), so that a group gets the same numbers whatever
other groups share its batch.
"""

from __future__ import annotations

import torch

from ..kernels import fused
from ..model.network import soft_cap
from .sampler import (
    MultinomialWords,
    entropy_bound_acceptance,
    multinomial_from_words,
    sample_tokens,
    token_entropy,
)
from .state import Denoising

# Float32 logits of the rows whose vocabulary-sized work runs together when scores come as `RowScores`.
ROW_BLOCK_BYTES = 4 << 20


class RowScores:
    """The decoder's scores, made a few groups' rows at a time from its last hidden states: on the CPU a
    block of about `ROW_BLOCK_BYTES` of logits stays in cache while the sampler's operations read it again
    and again, and a large batch's does not. Each of those operations works on each row alone, so the
    blocks do not change a row's numbers."""

    def __init__(self, hidden: torch.Tensor, head):
        self.hidden, self.head = hidden, head

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def rows(self, first: int, last: int) -> torch.Tensor:
        return self.head(self.hidden[first:last])


def _selects_without_asking(device: torch.device) -> bool:
    """Whether stopped rows are kept by selects on every step, without first asking the device whether any
    row stopped: on an accelerator the selects cost less than the wait, on the CPU it is the reverse."""
    return device.type != "cpu"


def _apply_processors(processors, input_ids, scores, cur_step):
    for processor, with_step in processors:
        scores = processor(input_ids, scores, cur_step=cur_step) if with_step else processor(input_ids, scores)
    return scores


def _logits_bytes(groups: list[Denoising]) -> int:
    return sum(g.rows * g.canvas_length * g.vocab_size * 4 for g in groups)


def _spans(groups: list[Denoising]) -> list[tuple[int, int]]:
    spans, start = [], 0
    for group in groups:
        spans.append((start, start + group.rows))
        start += group.rows
    return spans


def _per_row(groups: list[Denoising], values: list[torch.Tensor | float], device) -> torch.Tensor:
    """[rows, 1] float32: each group's value (a float or a 0-d float32 tensor) repeated over its rows."""
    return torch.cat([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(1).expand(g.rows)
                      for g, v in zip(groups, values)])[:, None]


def _sample(groups: list[Denoising], probs: torch.Tensor, words: list[MultinomialWords | None]) -> torch.Tensor:
    """Tokens from probs [rows, canvas, vocab], each group's from its own generator (and words drawn ahead)."""
    method = groups[0].plan.sampling
    if len(groups) == 1:
        return sample_tokens(probs, method, groups[0].generator, words[0])
    if method == "argmax":
        return probs.argmax(dim=-1)
    if method == "multinomial" and all(w is not None for w in words):
        drawn = MultinomialWords(torch.cat([w.words for w in words]), None, None)
        tokens = multinomial_from_words(probs.reshape(-1, probs.shape[-1]), drawn)
        if tokens is not None:
            return tokens.view(probs.shape[:-1])
    # Each group alone: where one group's words leave the answer to torch, only that group's is redone.
    return torch.cat([sample_tokens(probs[a:b], method, g.generator, w)
                      for g, (a, b), w in zip(groups, _spans(groups), words)])


def _vocabulary_work(groups: list[Denoising], scores: torch.Tensor, dtype: torch.dtype, cap: float | None,
                     capped: bool, input_ids, words: list, into: torch.Tensor | None, processed: torch.Tensor | None):
    """(sampled tokens, argmax tokens, entropies, processed logits) of groups that sample alike."""
    plan, device, single = groups[0].plan, scores.device, len(groups) == 1
    temperatures = [g.temperature() for g in groups]
    if plan.fused:
        group = groups[0]
        if single:
            temperature = temperatures[0]
            processed = into if into is not None else processed
        else:
            temperature = _per_row(groups, [1.0 if t is None else t for t in temperatures], device)[:, 0]
        # Where `into` already holds this canvas's logits, the kernel leaves its stopped rows as they are:
        # no vocabulary-sized select or copy.
        keeps = group.stop is not None and group.self_conditioning_logits is not None
        kept = group.finished[:, None] if single and keeps and group.self_conditioning_logits is processed else None
        if processed is None:
            processed = torch.empty(scores.shape, dtype=dtype, device=device)
        draws = [(g.generator, g.rows * g.canvas_length) for g in groups]
        denoised, argmax, entropy = fused.denoise(scores, None if capped else cap, temperature, plan.sampling, draws,
                                                  processed, kept)
        return denoised, argmax, entropy, processed
    if not capped:
        # The LM head's scores, as the fused kernel takes them, for a plan that does not run it.
        scores = soft_cap(scores.float() if scores.dtype != torch.float32 else scores.clone(), cap)
    if single:
        schedule = ((plan.schedule, True),) if plan.schedule is not None else ()
        logits = _apply_processors(plan.processors + schedule, input_ids, scores, groups[0].step)
    elif any(t is not None for t in temperatures):
        logits = scores / _per_row(groups, [1.0 if t is None else t for t in temperatures], device)[:, :, None]
    else:
        logits = scores
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    if plan.filters.active:
        probs = plan.filters.apply(probs)
    denoised = _sample(groups, probs, words)
    return denoised, torch.argmax(logits, dim=-1), token_entropy(logits), logits


def denoise_step(groups: list[Denoising], scores: torch.Tensor | RowScores, dtype: torch.dtype, cap: float | None,
                 input_ids: torch.Tensor | None = None, words: list[MultinomialWords | None] | None = None,
                 into: torch.Tensor | None = None, capped: bool = True) -> None:
    """One step for every row of `groups`, whose rows follow one another in `scores` [rows, canvas, vocab]:
    soft-capped float32 logits, or with `capped=False` the LM head's scores, which the fused kernel, or for
    a plan without it this step, soft-caps at `cap`; given as `RowScores`, they are made and used a block of rows at a
    time. `dtype`: the self-conditioning input's. `input_ids`: what the caller's logits processors see. `words`: per group, its multinomial words when drawn ahead. `into`: where the
    fused kernel writes the self-conditioning input (a CUDA graph's buffer; one group only). Groups are
    updated in place; each group's step counter moves on by one."""
    plan, device = groups[0].plan, scores.device
    words = words if words is not None else [None] * len(groups)
    single = len(groups) == 1
    spans = _spans(groups)
    # Rows that stopped keep their logits: with adaptive stopping, from a canvas's second step on.
    keeps = [g.stop is not None and g.self_conditioning_logits is not None for g in groups]
    processed = None
    if plan.fused and into is None and isinstance(scores, torch.Tensor):
        processed = torch.empty(scores.shape, dtype=dtype, device=device)
    # Runs of consecutive groups that sample alike share the vocabulary-sized work; scores made a group at a
    # time are used a group at a time.
    runs = []
    for index, group in enumerate(groups):
        first = groups[runs[-1][0]].plan if runs else None
        # A group's own logits processors see its rows alone.
        if first is not None and not first.processors and not group.plan.processors and (
                (first.sampling, first.filters) == (group.plan.sampling, group.plan.filters)) and (
                isinstance(scores, torch.Tensor) or _logits_bytes(groups[runs[-1][0]:index + 1]) <= ROW_BLOCK_BYTES):
            runs[-1][1] = index + 1
        else:
            runs.append([index, index + 1])
    if len(runs) == 1 and isinstance(scores, torch.Tensor):
        denoised, argmax, entropy, logits = _vocabulary_work(groups, scores, dtype, cap, capped, input_ids, words,
                                                             into, processed)
    else:
        parts = []
        for first, last in runs:
            a, b = spans[first][0], spans[last - 1][1]
            rows = scores[a:b] if isinstance(scores, torch.Tensor) else scores.rows(a, b)
            parts.append(_vocabulary_work(groups[first:last], rows, dtype, cap, capped, input_ids if single else None,
                                          words[first:last], into if single else None,
                                          None if processed is None else processed[a:b]))
        denoised, argmax, entropy = (torch.cat([part[i] for part in parts]) for i in range(3))
        logits = processed if processed is not None else torch.cat([part[3] for part in parts])

    bound = plan.entropy_bound if single else _per_row(groups, [g.plan.entropy_bound for g in groups], device)
    accepted = entropy_bound_acceptance(entropy, bound)
    current = torch.cat([g.current for g in groups]) if not single else groups[0].current
    current = torch.where(accepted, denoised, current)
    noise = groups[0].noise() if single else torch.cat([g.noise() for g in groups])
    current = torch.where(accepted, current, noise)

    cast = None  # the batch's logits in `dtype`, made once for every group that keeps them as they are
    for group, (a, b), keep in zip(groups, spans, keeps):
        group_argmax, group_current = argmax[a:b], current[a:b]
        group_logits = logits if single else logits[a:b]
        replaced = False
        if group.stop is not None:
            # Rows that already stopped keep their canvas, argmax and logits. On a canvas's first step no row
            # has stopped yet, and there may be no logits to keep.
            done = group.finished
            if keep and (_selects_without_asking(device) or bool(done.any())):
                group_argmax = torch.where(done[:, None], group.argmax, group_argmax)
                group_current = torch.where(done[:, None], group.current, group_current)
                if group_logits is not group.self_conditioning_logits:
                    group_logits = torch.where(done[:, None, None], group.self_conditioning_logits, group_logits)
                    replaced = True
            group.finished = done | group.stop(group_argmax, group_logits, entropy=entropy[a:b])
        group.current, group.argmax = group_current, group_argmax
        if replaced:
            group.self_conditioning_logits = group_logits.to(dtype)
        else:
            cast = logits.to(dtype) if cast is None else cast
            group.self_conditioning_logits = cast if single else cast[a:b]
        group.taken += 1
