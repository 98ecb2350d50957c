"""The block-diffusion training objective, as the public DiffusionGemma SFT recipes define it.

Per example: the context is encoded causally (with gradients, through a differentiable cache); one
noise level t ~ U(eps, 1) is drawn; every canvas position is replaced, with probability t, by a token
drawn uniformly from the vocabulary (uniform-state diffusion: there is no mask token, exactly as the
sampler's starting canvas and its renoising); the decoder predicts the clean canvas and is scored by
cross-entropy at every position, unweighted in t (the recipes' "base" objective). With probability
`self_conditioning_p` an example is trained with self-conditioning: a first decoder pass without
gradients gives logits that the second pass reads, as the previous denoising step's logits are read
at inference. An optional next-token loss on the encoder's outputs keeps the encoder a language model
over the answer tokens it sees as context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.cache import KVCache
from .data import Batch


@dataclass(frozen=True)
class ObjectiveSettings:
    noise_eps: float = 1e-3
    self_conditioning_p: float = 0.5
    encoder_loss_weight: float = 1.0


def sample_noise_levels(batch: int, eps: float, generator: torch.Generator) -> torch.Tensor:
    return eps + (1 - eps) * torch.rand(batch, generator=generator)


def corrupt_canvas(canvas: torch.Tensor, noise_level: torch.Tensor, vocab_size: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy canvas, which positions were redrawn): each position of row i is redrawn uniformly from the
    vocabulary with probability noise_level[i]; a redraw may land on the clean token itself."""
    redrawn = torch.rand(canvas.shape, generator=generator) < noise_level[:, None]
    noise = torch.randint(0, vocab_size, canvas.shape, generator=generator)
    return torch.where(redrawn, noise, canvas), redrawn


def canvas_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every canvas position, in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten())


def encoder_loss(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Next-token cross-entropy of the encoder at its scored positions; None when the batch has none."""
    scored = targets != -100
    if not bool(scored.any()):
        return None
    return F.cross_entropy(model.logits(hidden[:, :-1][scored]), targets[scored])


def encode(model, batch: Batch) -> tuple[KVCache, torch.Tensor]:
    cache = KVCache(model.config.text_config, differentiable=True)
    encoded = model.model.encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  position_ids=batch.positions, past_key_values=cache)
    return cache, encoded.last_hidden_state


def decode(model, cache: KVCache, batch: Batch, canvas: torch.Tensor, self_conditioning_logits=None,
           self_conditioning_mask=None) -> torch.Tensor:
    """Canvas logits; the canvas sits right after each row's context, as in `generate`."""
    length = canvas.shape[1]
    mask = F.pad(batch.attention_mask, (0, length), value=True)
    positions = batch.context_lengths[:, None] + torch.arange(length, device=canvas.device)[None]
    return model(decoder_input_ids=canvas, past_key_values=cache, decoder_attention_mask=mask,
                 decoder_position_ids=positions, self_conditioning_logits=self_conditioning_logits,
                 self_conditioning_mask=self_conditioning_mask).logits


def block_diffusion_loss(model, batch: Batch, settings: ObjectiveSettings, generator: torch.Generator,
                         fixed_passes: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to minimise for one batch, and its parts for logging. Random draws come from `generator`
    (on the CPU) in a fixed order, so a run is reproducible from its seed. `fixed_passes`: every batch
    builds the same autograd graph, whatever its rows: the self-conditioning pass runs even when no row
    reads it (those rows read its zeros, which the self-conditioning MLP maps to exactly zero), and a batch
    without encoder targets adds an encoder term of zero. The loss is the same; the ranks of an FSDP job
    then gather and reduce each unit's weights and gradients in the same order, as collectives must be."""
    rows, device = batch.target.shape[0], batch.target.device
    noise_level = sample_noise_levels(rows, settings.noise_eps, generator)
    noisy, _ = corrupt_canvas(batch.target.cpu(), noise_level, model.config.text_config.vocab_size, generator)
    self_conditioned = torch.rand(rows, generator=generator) < settings.self_conditioning_p
    noisy, self_conditioned = noisy.to(device), self_conditioned.to(device)

    cache, encoder_hidden = encode(model, batch)
    first, conditioned = None, bool(self_conditioned.any())
    if conditioned or fixed_passes:
        with torch.no_grad():
            first = decode(model, cache, batch, noisy)
    logits = decode(model, cache, batch, noisy, first, self_conditioned if first is not None else None)
    loss = canvas_loss(logits, batch.target)
    parts = {"diffusion_loss": loss.item()}
    if settings.encoder_loss_weight:
        extra = encoder_loss(model, encoder_hidden, batch.encoder_targets)
        if extra is not None:
            loss = loss + settings.encoder_loss_weight * extra
            parts["encoder_loss"] = extra.item()
        elif fixed_passes:
            loss = loss + model.logits(encoder_hidden[:, :0]).sum()
    return loss, parts


@torch.no_grad()
def denoising_metrics(model, batch: Batch, generator: torch.Generator) -> tuple[float, int, int]:
    """(summed cross-entropy, correct argmax tokens, scored tokens) over the answer tokens of one batch, at
    one noise level per example drawn from `generator`, without self-conditioning (a first denoising step)."""
    noise_level = sample_noise_levels(batch.target.shape[0], 0.0, generator)
    noisy, _ = corrupt_canvas(batch.target.cpu(), noise_level, model.config.text_config.vocab_size, generator)
    cache, _ = encode(model, batch)
    logits = decode(model, cache, batch, noisy.to(batch.target.device)).float()
    scored = batch.answer_mask
    loss = F.cross_entropy(logits[scored], batch.target[scored], reduction="sum").item()
    correct = int((logits.argmax(dim=-1)[scored] == batch.target[scored]).sum())
    return loss, correct, int(scored.sum())
