"""Block-diffusion generation: the loop that ties the model to the sampler.

Per canvas: encode the uncached tokens into the cache, start a canvas from noise, denoise it for up to
`max_denoising_steps` steps (n counts down from N to 1), commit its argmax, and go on to the next canvas
until every row has finished or the length limit is reached.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..kernels.experts import row_independent
from ..model.cache import KVCache, check_cache, check_mask
from ..model.config import read_json
from .graphs import captures, graphed_passes
from .runner import EagerRunner, GraphedRunner, decode_drawing_words
from .sampler import EntropyBoundSamplerConfig
from .state import Denoising, SamplingPlan
from .step import denoise_step

# Every cache layout gives the reference's default-cache answer here, so both names mean the same.
CACHE_IMPLEMENTATIONS = ("dynamic", "static")
# Keys of generation_config.json that describe the file, not the generation.
METADATA_KEYS = ("transformers_version", "_from_model_config", "_commit_hash")
MODEL_INPUTS = ("attention_mask", "decoder_input_ids", "self_conditioning_logits", "pixel_values",
                "image_position_ids", "mm_token_type_ids")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class DiffusionGemmaGenerationConfig:
    """Generation parameters; unset ones (None) fall back to the model's, then to `defaults()`.

    Setting `t_min`/`t_max` to None turns the temperature schedule off, and `stability_threshold` or
    `confidence_threshold` to None turns adaptive stopping off (every canvas then takes all steps).
    `fast_sampling=True` samples each position by inverting its cumulative distribution instead of the
    reference's `torch.multinomial`: the same distribution, other random numbers (see `sample_tokens`).
    `cuda_graphs=False` runs every pass eagerly on CUDA instead of replaying the decoder pass and the
    commit captured once per batch size and cache capacity (see `graphs.py`); the two differ in the
    attention's last bits, which may change a token. `fused_sampler=False` runs the
    sampler's vocabulary-sized work as torch's operations on CUDA instead of one Triton kernel (see
    `fused.py`), with the reference's roundings. `prefill_chunk_size=C` encodes the prompt C tokens at a
    time, as `serve` does (its `--prefill-chunk`), instead of in one pass: the attention's sums then run in
    other pieces, so a prompt longer than C can get other tokens. `batch_invariant=True` runs the experts'
    products as `serve` does, in fixed tiles of rows whose bits do not depend on the other rows (see
    `kernels/experts.py`), instead of the reference's `F.grouped_mm`. A served answer is what `generate`
    gives for its prompt alone, after `torch.manual_seed(seed)`, with both set as the server runs.
    """

    FIELDS = ("max_new_tokens", "max_length", "return_dict_in_generate", "max_denoising_steps", "sampler_config",
              "t_min", "t_max", "stability_threshold", "confidence_threshold", "cache_implementation",
              "bos_token_id", "pad_token_id", "eos_token_id", "fast_sampling", "cuda_graphs",
              "fused_sampler", "prefill_chunk_size", "batch_invariant")

    def __init__(self, **kwargs: Any):
        for name in self.FIELDS:
            setattr(self, name, None)
        self.return_dict_in_generate = True
        self.fast_sampling = False
        self.cuda_graphs = True
        self.fused_sampler = True
        self.batch_invariant = False
        self.metadata = {k: kwargs.pop(k) for k in METADATA_KEYS if k in kwargs}
        unknown = sorted(set(kwargs) - set(self.FIELDS))
        if unknown:
            raise ValueError(f"unknown generation parameters: {unknown}")
        for name, value in kwargs.items():
            setattr(self, name, value)
        self.sampler_config = self._sampler_config(self.sampler_config)
        self.validate()

    @staticmethod
    def defaults() -> dict[str, Any]:
        return {"max_new_tokens": 256, "max_denoising_steps": 48,
                "sampler_config": EntropyBoundSamplerConfig(entropy_bound=0.1), "t_min": 0.4, "t_max": 0.8,
                "stability_threshold": 1, "confidence_threshold": 0.005}

    @staticmethod
    def _sampler_config(value):
        if isinstance(value, dict):
            fields = dict(value)
            name = fields.pop("_cls_name", "EntropyBoundSamplerConfig")
            if name != "EntropyBoundSamplerConfig":
                raise ValueError(f"unknown `sampler_config` class {name!r}; expected 'EntropyBoundSamplerConfig'")
            try:
                return EntropyBoundSamplerConfig(**fields)
            except TypeError as error:
                raise ValueError(f"bad `sampler_config` {value!r}: {error}") from None
        return value

    def validate(self) -> None:
        def fail(name, requirement):
            raise ValueError(f"`{name}` must be {requirement}, got {getattr(self, name)!r}")

        for name in ("max_new_tokens", "max_length", "max_denoising_steps", "prefill_chunk_size"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value <= 0):
                fail(name, "a positive integer")
        if self.sampler_config is not None and not isinstance(self.sampler_config, EntropyBoundSamplerConfig):
            fail("sampler_config", "an EntropyBoundSamplerConfig")
        for name in ("t_min", "t_max"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value < 0):
                fail(name, "a number >= 0")
        if self.t_min is not None and self.t_max is not None and self.t_max <= self.t_min:
            raise ValueError(f"`t_max` ({self.t_max}) must be greater than `t_min` ({self.t_min})")
        if self.stability_threshold is not None and (not _is_int(self.stability_threshold)
                                                     or self.stability_threshold < 0):
            fail("stability_threshold", "an integer >= 0")
        if self.confidence_threshold is not None and (not _is_number(self.confidence_threshold)
                                                      or self.confidence_threshold <= 0):
            fail("confidence_threshold", "a number > 0")
        if self.cache_implementation is not None and self.cache_implementation not in CACHE_IMPLEMENTATIONS:
            fail("cache_implementation", f"one of {CACHE_IMPLEMENTATIONS}")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                fail(name, "a token id (integer >= 0)")
        eos = self.eos_token_id
        if eos is not None and not (_is_int(eos) and eos >= 0) and not (
                isinstance(eos, (list, tuple)) and eos and all(_is_int(e) and e >= 0 for e in eos)):
            fail("eos_token_id", "a token id or a non-empty list of token ids")
        for name in ("return_dict_in_generate", "fast_sampling", "cuda_graphs", "fused_sampler", "batch_invariant"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "a bool")

    def update(self, defaults_only: bool = False, **kwargs) -> dict[str, Any]:
        """Sets the known parameters (only unset ones with `defaults_only`); returns the other kwargs."""
        rest = {}
        for name, value in kwargs.items():
            if name not in self.FIELDS:
                rest[name] = value
            elif not defaults_only or getattr(self, name) is None:
                setattr(self, name, self._sampler_config(value))
        self.validate()
        return rest

    def to_dict(self) -> dict[str, Any]:
        out = {name: copy.deepcopy(getattr(self, name)) for name in self.FIELDS}
        # The reference's generation config knows none of these switches: written only when not the default.
        for name in ("fast_sampling", "batch_invariant"):
            if not getattr(self, name):
                del out[name]
        for name in ("cuda_graphs", "fused_sampler"):
            if getattr(self, name):
                del out[name]
        if self.prefill_chunk_size is None:
            del out["prefill_chunk_size"]
        if isinstance(self.sampler_config, EntropyBoundSamplerConfig):
            out["sampler_config"] = self.sampler_config.to_dict()
        out.update(self.metadata)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiffusionGemmaGenerationConfig:
        return cls(**copy.deepcopy(data))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> DiffusionGemmaGenerationConfig:
        path = os.path.join(folder, "generation_config.json") if os.path.isdir(folder) else folder
        return cls.from_dict(read_json(path))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, sort_keys=True)
            handle.write("\n")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.to_dict(), sort_keys=True)})"


@dataclass
class DiffusionGemmaGenerationOutput:
    """`sequences`: prompt and generated canvases; `tokens_per_forward`: per row, non-pad generated
    tokens per decoder pass; `past_key_values`: the cache, to continue a conversation."""

    sequences: torch.Tensor
    tokens_per_forward: torch.Tensor | None = None
    past_key_values: KVCache | None = None

    def __getitem__(self, key: str):
        return getattr(self, key)


def _with_step(processor) -> bool:
    # Processors that take more than (input_ids, scores) get the step, as transformers' list does.
    return len(inspect.signature(processor.__call__).parameters) > 2


IMAGE_INPUTS = ("pixel_values", "image_position_ids", "mm_token_type_ids")


def _encode(runner, tokens, attention_mask, positions, chunk: int | None, images: dict) -> None:
    """Encodes `tokens` (after the cached ones, all covered by `attention_mask`) in one pass, or `chunk`
    tokens at a time as the server encodes a prompt."""
    if chunk is None:
        runner.encode(tokens, attention_mask, positions, **images)
        return
    seen = attention_mask.shape[1] - tokens.shape[1]
    for start in range(0, tokens.shape[1], chunk):
        end = min(start + chunk, tokens.shape[1])
        runner.encode(tokens[:, start:end], attention_mask[:, :seen + end], positions[:, start:end])


class MaxLengthCriteria:
    def __init__(self, max_length: int):
        self.max_length = max_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.max_length, device=input_ids.device)


class EosTokenCriteria:
    """Finished when any of the last `new_token_length` tokens is an end-of-sequence token."""

    def __init__(self, eos_token_id: torch.Tensor):
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.Tensor, scores, new_token_length: int = 1, **kwargs) -> torch.Tensor:
        return torch.isin(input_ids[:, -new_token_length:], self.eos_token_id).any(dim=-1)


def generation_settings(model, generation_config, kwargs):
    """The generation config a call runs with (the caller's over the model's over the defaults), and the
    model inputs among `kwargs`; raises ValueError naming an unknown or bad parameter."""
    base = generation_config or model.generation_config or DiffusionGemmaGenerationConfig()
    if not isinstance(base, DiffusionGemmaGenerationConfig):
        raise ValueError("`generation_config` must be a DiffusionGemmaGenerationConfig")
    config = copy.deepcopy(base)
    config.update(defaults_only=True, **{k: v for k, v in model.generation_config.to_dict().items()
                                         if k in config.FIELDS})
    config.update(defaults_only=True, **config.defaults())
    model_kwargs = config.update(**kwargs)
    model_kwargs.pop("use_cache", None)  # the cache is always on
    unknown = sorted(set(model_kwargs) - set(MODEL_INPUTS))
    if unknown:
        raise ValueError(f"`generate` got unknown arguments {unknown}")
    return config, model_kwargs


def length_limits(model, config: DiffusionGemmaGenerationConfig, cur_len: int) -> tuple[int, int]:
    """(max_length, max_new_tokens), counting cached tokens in the length."""
    if config.max_length and config.max_new_tokens == 256:
        # As in the reference: an explicit max_length wins over the untouched default max_new_tokens.
        max_length, max_new_tokens = config.max_length, config.max_length - cur_len
        if max_new_tokens <= 0:
            raise ValueError(f"`max_length` ({max_length}) leaves no room after the {cur_len} prompt tokens")
    elif config.max_new_tokens is None:
        raise ValueError("`max_new_tokens` must be a positive integer, got None")
    else:
        max_new_tokens, max_length = config.max_new_tokens, config.max_new_tokens + cur_len
    if max_length > model.config.text_config.max_position_embeddings:
        raise ValueError(f"the prompt and {max_new_tokens} new tokens ({max_length} positions) exceed the "
                         f"model's {model.config.text_config.max_position_embeddings} positions")
    return max_length, max_new_tokens


class GenerationMixin:
    """`generate` for DiffusionGemmaForBlockDiffusion."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        streamer=None,
        generation_config: DiffusionGemmaGenerationConfig | None = None,
        logits_processor=None,
        stopping_criteria=None,
        **kwargs,
    ):
        config, model_kwargs = generation_settings(self, generation_config, kwargs)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("`input_ids` must be a 2D tensor [batch, tokens]")
        image_token = self.config.image_token_id
        if "pixel_values" not in model_kwargs and image_token is not None and bool((input_ids == image_token).any()):
            raise ValueError("the prompt holds image tokens but no `pixel_values` were given; pass the "
                             "processor's whole output to `generate`")
        if past_key_values is not None and config.cache_implementation is not None:
            raise ValueError("pass either `past_key_values` or `cache_implementation`, not both")
        canvas_length = self.config.canvas_length
        batch, prompt_length = input_ids.shape
        cur_len = prompt_length + (past_key_values.get_seq_length() if past_key_values is not None else 0)
        max_length, max_new_tokens = length_limits(self, config, cur_len)

        device = input_ids.device
        eos = torch.tensor(config.eos_token_id, device=device) if config.eos_token_id is not None else None
        attention_mask = model_kwargs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones(batch, cur_len, dtype=torch.bool, device=device)
        elif attention_mask.dim() != 2:
            raise ValueError("`attention_mask` passed to `generate` must be 2D")
        attention_mask = attention_mask.bool()
        vocab_size = self.config.text_config.vocab_size
        for name, shape in (("decoder_input_ids", (batch, canvas_length)),
                            ("self_conditioning_logits", (batch, canvas_length, vocab_size))):
            given = model_kwargs.get(name)
            if given is not None and (not isinstance(given, torch.Tensor) or tuple(given.shape) != shape):
                found = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
                raise ValueError(f"`{name}` must be a tensor of shape {shape} (batch, canvas_length"
                                 f"{', vocab_size' if len(shape) == 3 else ''}), got {found}")
        canvases = math.ceil(max_new_tokens / canvas_length)
        encoder_positions = torch.arange(cur_len - prompt_length, cur_len, dtype=torch.int32, device=device)[None]

        processors = [(processor, _with_step(processor)) for processor in (logits_processor or [])]
        sampling = "inverse_cdf" if config.fast_sampling else "multinomial"
        plan = SamplingPlan.resolve(device, config.max_denoising_steps, config.t_min, config.t_max,
                                    config.sampler_config.entropy_bound, config.stability_threshold,
                                    config.confidence_threshold, sampling, config.fused_sampler, processors)
        stops = list(stopping_criteria or []) + [MaxLengthCriteria(max_length)]
        if eos is not None:
            stops.append(EosTokenCriteria(eos))
        # None: torch's global generator, as the reference draws from.
        canvas = Denoising(plan, None, batch, canvas_length, vocab_size, device)
        finished_rows = torch.zeros(batch, dtype=torch.bool, device=device)
        decoder_passes = torch.zeros(batch, dtype=torch.int, device=device)
        if streamer is not None:
            streamer.put(input_ids.cpu())

        prefill_chunk = config.prefill_chunk_size
        if prefill_chunk is not None and "pixel_values" in model_kwargs:
            raise ValueError("`prefill_chunk_size` cannot split a prompt with images: an image's tokens attend to "
                             "each other in one pass")
        graphed = None
        # Chunks are the server's eager passes; the graphs' prefill is one pass.
        if config.cuda_graphs and prefill_chunk is None and captures(device) and (past_key_values is None or (
                isinstance(past_key_values, KVCache) and not past_key_values.differentiable)):
            # The eager path's encoder checks these; here they are copied into the graphs' own cache first.
            check_cache(past_key_values, batch)
            check_mask("attention_mask", attention_mask, batch, cur_len)
            # Every canvas but the last is committed.
            graphed = graphed_passes(self, batch, cur_len + (canvases - 1) * canvas_length)
            runner = GraphedRunner(graphed, past_key_values, soft_capped=not plan.fused)
        else:
            cache = past_key_values if past_key_values is not None else KVCache(self.config.text_config,
                                                                                 canvas_length)
            runner = EagerRunner(self, cache, soft_capped=not plan.fused)
        dtype = self.model.backbone.embed_tokens.weight.dtype
        cap = self.config.text_config.final_logit_softcapping
        try:
            with row_independent() if config.batch_invariant else contextlib.nullcontext():
                new_tokens = input_ids
                for _ in range(canvases):
                    images = {k: model_kwargs.pop(k) for k in IMAGE_INPUTS if k in model_kwargs}
                    _encode(runner, new_tokens, attention_mask, encoder_positions, prefill_chunk, images)
                    # Committed canvases are encoded whole.
                    prefill_chunk = None
                    cur_len = runner.cache.get_seq_length()
                    decoder_positions = torch.arange(cur_len, cur_len + canvas_length, dtype=torch.int32,
                                                     device=device)[None]
                    decoder_mask = torch.nn.functional.pad(attention_mask, (0, canvas_length), value=True)
                    runner.start_canvas(decoder_mask, decoder_positions)
                    canvas.start(model_kwargs.pop("decoder_input_ids", None),
                                 model_kwargs.pop("self_conditioning_logits", None))
                    while not canvas.out_of_steps:
                        decoder_passes += ~(canvas.finished | finished_rows)
                        scores, words = decode_drawing_words(
                            lambda: runner.decode(canvas.current, canvas.self_conditioning_logits), [canvas])
                        denoise_step([canvas], scores, dtype, cap, input_ids, words, runner.self_conditioning_buffer,
                                     capped=runner.soft_capped)
                        canvas.self_conditioning_logits = runner.keep(canvas.self_conditioning_logits)
                        if streamer is not None and hasattr(streamer, "put_draft"):
                            # The argmax canvas is the draft closest to what will be committed; a streamer
                            # that says `_takes_logits` (the tests' view of each step) gets the logits.
                            if getattr(streamer, "_takes_logits", False):
                                streamer.put_draft(logits=canvas.self_conditioning_logits.cpu())
                            else:
                                streamer.put_draft(value=canvas.argmax.cpu())
                        # Only adaptive stopping finishes a canvas early; without it, no step waits for the device.
                        if plan.adaptive and bool(canvas.finished.all()):
                            break

                    input_ids = torch.cat([input_ids, canvas.argmax], dim=-1)
                    finished_rows = self._commit_canvas(input_ids, finished_rows, stops, eos, config.pad_token_id,
                                                         canvas_length)
                    if streamer is not None:
                        streamer.put(input_ids[:, -canvas_length:].cpu())
                    if bool(finished_rows.all()):
                        break
                    new_tokens = input_ids[:, -canvas_length:]
                    attention_mask = decoder_mask
                    encoder_positions = decoder_positions

            if streamer is not None:
                streamer.end()
            cache = runner.cache
            if graphed is not None and (past_key_values is not None or config.return_dict_in_generate):
                # As without graphs, a caller's cache goes on to hold the conversation.
                cache = cache.to_dynamic(past_key_values)
        finally:
            if graphed is not None:
                # Also when the call fails (a streamer's or a stopping criterion's error, an interrupt): the
                # next call of this shape then reuses the graphs instead of capturing its own.
                graphed.lock.release()
        if not config.return_dict_in_generate:
            return input_ids
        generated = input_ids[:, prompt_length:]
        valid = (generated != config.pad_token_id).sum(dim=-1) if config.pad_token_id is not None else generated.shape[1]
        return DiffusionGemmaGenerationOutput(sequences=input_ids, tokens_per_forward=valid / decoder_passes,
                                              past_key_values=cache)

    @staticmethod
    def _commit_canvas(input_ids, finished_rows, stops, eos, pad_token_id, canvas_length):
        """Marks the rows that finished; pads, in place, what follows the first end-of-sequence token of
        this canvas and the whole canvas of rows that had finished before."""
        finished_now = torch.zeros_like(finished_rows)
        for stop in stops:
            finished_now = finished_now | stop(input_ids, None, new_token_length=canvas_length)
        finished = finished_rows | finished_now
        if pad_token_id is not None and bool(finished.any()):
            input_ids[finished_rows, -canvas_length:] = pad_token_id
            if eos is not None and bool(finished_now.any()):
                canvas = input_ids[:, -canvas_length:]
                is_eos = torch.isin(canvas, eos)
                eos_seen = is_eos.cumsum(dim=-1)
                canvas[(eos_seen > 0) & ~((eos_seen == 1) & is_eos)] = pad_token_id
        return finished
