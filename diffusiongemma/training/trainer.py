"""Training: a YAML recipe in, checkpoints and a trained model out.

    diffusiongemma train recipe.yaml        # or: train(TrainingConfig.from_yaml("recipe.yaml"))

The loop is plain: AdamW with linear warm-up and cosine decay, gradient accumulation and clipping,
bfloat16 autocast on CUDA, an evaluation on held-out chats (loss and denoising accuracy), checkpoints
that resume exactly. Exactly means the same losses as an uninterrupted run: the weights (or, with LoRA,
the adapters) and the optimizer state are saved bit for bit, the data order follows from the seed and
the epoch, and each micro-batch's random draws come from a generator seeded by its own index. Every
checkpoint is also a model folder like `final/`, to generate from.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
import shutil
import sys
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
import torch.utils.checkpoint

from ..distributed import fsdp
from ..distributed.runtime import is_leader
from ..hf.loading import resolve_folder
from ..hf.modeling import DiffusionGemmaForBlockDiffusion
from ..hf.processing import AutoProcessor
from .data import canvas_examples, collate, epoch_batches, read_chats
from .lora import apply_lora, load_adapter_weights, lora_merged, save_adapter
from .objective import ObjectiveSettings, block_diffusion_loss, denoising_metrics

# What a trained model folder needs besides its weights and config.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "processor_config.json", "preprocessor_config.json")
STATE_FILE = "training_state.pt"
ADAPTER_FOLDER = "adapter"


@dataclass
class LoRASettings:
    rank: int = 8
    alpha: float = 16.0


@dataclass
class TrainingConfig:
    """One training run. Paths are relative to the recipe file when read with `from_yaml`."""

    model: str  # checkpoint folder or Hub id to start from
    train_data: str  # JSONL, one {"messages": [...]} chat per line
    output: str  # checkpoints go to output/checkpoint-STEP, the trained model to output/final
    eval_data: str | None = None
    steps: int = 1000
    batch_size: int = 16  # canvases per micro-batch
    gradient_accumulation: int = 1
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    noise_eps: float = 1e-3
    self_conditioning_p: float = 0.5
    encoder_loss_weight: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    device: str = "auto"
    threads: int | None = None
    lora: LoRASettings | None = None
    activation_checkpointing: bool = False  # recompute each layer's feed-forward blocks in the backward pass

    def __post_init__(self):
        if isinstance(self.lora, dict):
            unknown = sorted(set(self.lora) - {f.name for f in fields(LoRASettings)})
            if unknown:
                raise ValueError(f"unknown `lora` settings {unknown}{_suggestions(unknown, ['rank', 'alpha'])}; "
                                 "known: rank, alpha")
            self.lora = LoRASettings(**self.lora)
        elif self.lora is not None and not isinstance(self.lora, LoRASettings):
            raise ValueError(f"`lora` must be a mapping such as {{rank: 8, alpha: 16}}, got {self.lora!r}")
        if not isinstance(self.adam_betas, (list, tuple)):
            raise ValueError(f"`adam_betas` must be two numbers in [0, 1), got {self.adam_betas!r}")
        self.adam_betas = tuple(self.adam_betas)
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, name: str, requirement: str):
            if not ok:
                raise ValueError(f"`{name}` must be {requirement}, got {getattr(self, name, None)!r}")

        for name in ("model", "train_data", "output"):
            need(isinstance(getattr(self, name), str) and getattr(self, name), name, "a non-empty string")
        need(self.eval_data is None or isinstance(self.eval_data, str), "eval_data", "a path or absent")
        for name in ("steps", "batch_size", "gradient_accumulation", "log_every"):
            need(_is_int(getattr(self, name)) and getattr(self, name) > 0, name, "a positive integer")
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "an integer >= 0")
        need(_is_number(self.learning_rate) and self.learning_rate > 0, "learning_rate", "a number > 0")
        need(_is_number(self.min_learning_rate) and 0 <= self.min_learning_rate <= self.learning_rate,
             "min_learning_rate", "a number between 0 and learning_rate")
        for name in ("weight_decay", "encoder_loss_weight"):
            need(_is_number(getattr(self, name)) and getattr(self, name) >= 0, name, "a number >= 0")
        need(_is_number(self.max_grad_norm) and self.max_grad_norm > 0, "max_grad_norm", "a number > 0")
        need(len(self.adam_betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in self.adam_betas),
             "adam_betas", "two numbers in [0, 1)")
        need(_is_number(self.noise_eps) and 0 <= self.noise_eps < 1, "noise_eps", "a number in [0, 1)")
        need(_is_number(self.self_conditioning_p) and 0 <= self.self_conditioning_p <= 1, "self_conditioning_p",
             "a probability in [0, 1]")
        need(self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:"), "device",
             "auto, cpu, cuda or cuda:N")
        need(self.threads is None or (_is_int(self.threads) and self.threads > 0), "threads", "a positive integer")
        need(isinstance(self.activation_checkpointing, bool), "activation_checkpointing", "true or false")
        if self.lora is not None:
            need(_is_int(self.lora.rank) and self.lora.rank > 0, "lora", "a rank that is a positive integer")
            need(_is_number(self.lora.alpha) and self.lora.alpha > 0, "lora", "an alpha > 0")

    @classmethod
    def from_dict(cls, data: dict, base: Path | None = None) -> TrainingConfig:
        if not isinstance(data, dict):
            raise ValueError("a training recipe must be a mapping of settings")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}{_suggestions(unknown, known)}; "
                             f"known: {sorted(known)}")
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.default is MISSING)
        if missing:
            raise ValueError(f"the training recipe lacks {missing}")
        data = dict(data)
        for name in ("train_data", "eval_data", "output", "model"):
            value = data.get(name)
            # A relative path means relative to the recipe; a model that is no folder there is a Hub id.
            if base is not None and isinstance(value, str) and not Path(value).is_absolute():
                if name != "model" or (base / value).exists():
                    data[name] = str(base / value)
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainingConfig:
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from None
        return cls.from_dict(data, base=path.parent)

    def objective(self) -> ObjectiveSettings:
        return ObjectiveSettings(self.noise_eps, self.self_conditioning_p, self.encoder_loss_weight)


def _suggestions(unknown: list, known) -> str:
    """' (did you mean ...?)' with the known name closest to each unknown one that has a close one."""
    # 0.7, not difflib's 0.6: at 0.6 `colour` would be taken for `lora`.
    close = {name: difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.7) for name in unknown
             if isinstance(name, str)}
    close = {name: match[0] for name, match in close.items() if match}
    if not close:
        return ""
    if len(unknown) == 1:
        return f" (did you mean {close[unknown[0]]!r}?)"
    return " (did you mean " + ", ".join(f"{match!r} for {name!r}" for name, match in close.items()) + "?)"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def learning_rate(config: TrainingConfig, step: int) -> float:
    """Linear warm-up to `learning_rate`, then cosine decay to `min_learning_rate` at the last step."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.min_learning_rate + (config.learning_rate - config.min_learning_rate) * cosine


@torch.no_grad()
def initialize_weights(model: DiffusionGemmaForBlockDiffusion, seed: int) -> None:
    """Weights to train from scratch: normal(0, initializer_range) matrices and embeddings; norms and scales
    at one."""
    std = model.config.text_config.initializer_range
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if parameter.dim() >= 2:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
        elif "bias" in name:
            parameter.zero_()
        else:
            parameter.fill_(1.0)


def checkpoint_feed_forward(model) -> None:
    """Activation checkpointing: each layer's dense MLP and experts keep only their inputs, and run again in
    the backward pass. The attention keeps its activations: its encoder pass appends to the cache, which a
    second run would append to again."""
    for layer in model.model.backbone.layers:
        for block in (layer.mlp, layer.experts):
            block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


def _optimizer(model, config: TrainingConfig) -> torch.optim.AdamW:
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Decay matrices only: norms and scales are multiplicative gains that should stay near one.
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.adam_betas)


def _device(config: TrainingConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("`device` asks for CUDA, but PyTorch sees no CUDA device here")
    return torch.device(config.device)


def _autocast(device: torch.device):
    # bfloat16 products on the GPU; the model keeps norms, softmaxes and logits in float32 itself.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)


class Progress:
    """One status line (rewritten in place on a terminal): step, loss, learning rate, tokens/s, time left.
    With no stream (the ranks of a job other than the leader) it only counts."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream = total, stream
        self.started = time.perf_counter()
        self.tokens = 0

    def update(self, step: int, first_step: int, loss: float, lr: float, tokens: int, show: bool) -> None:
        self.tokens += tokens
        if not show or self.stream is None:
            return
        elapsed = time.perf_counter() - self.started
        done = step - first_step
        remaining = elapsed / max(done, 1) * (self.total - step)
        line = (f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {self.tokens / elapsed:,.0f} tokens/s"
                f"  {remaining / 60:.1f} min left")
        end = "\r" if self.stream.isatty() else "\n"
        self.stream.write(line + end)
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.stream is None:
            return
        self.stream.write(("\n" if self.stream.isatty() else "") + text + "\n")
        self.stream.flush()


def evaluate(model, examples, batch_size: int, pad_token_id: int, seed: int = 0) -> dict[str, float]:
    """Held-out cross-entropy and denoising accuracy on answer tokens, each example at one noise level drawn
    from `seed`: the same figures for the same model and data on any run."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    total_loss, correct, scored = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_token_id).to(model.device)
        loss, right, count = denoising_metrics(model, batch, generator)
        total_loss, correct, scored = total_loss + loss, correct + right, scored + count
    model.train(was_training)
    return {"loss": total_loss / scored, "accuracy": correct / scored, "tokens": scored}


CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def _checkpoints(output: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    found = [p for p in output.glob("checkpoint-*") if CHECKPOINT.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(CHECKPOINT.fullmatch(p.name)[1]))


def _earlier_run(output: Path) -> list[Path]:
    return _checkpoints(output) + [p for p in (output / "final",) if p.exists()]


def _check_start(config: TrainingConfig, output: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from, if any. A start that cannot go on, or would mix two runs in one folder,
    is refused here, before anything is loaded or written."""
    if resume and overwrite:
        raise ValueError("resuming a run and overwriting it exclude each other; choose one")
    for key in ("train_data", "eval_data"):
        path = getattr(config, key)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"`{key}` names no file: {path}")
    if resume:
        checkpoints = _checkpoints(output)
        if not checkpoints:
            raise ValueError(f"nothing to resume: {output} holds no checkpoint-STEP folder")
        latest = checkpoints[-1]
        if not (latest / STATE_FILE).is_file() or not (latest / "config.json").is_file():
            raise ValueError(f"{latest} lacks {STATE_FILE} or config.json: it was written by an older version, "
                             "whose checkpoints cannot be resumed")
        return latest
    earlier = _earlier_run(output)
    if earlier and not overwrite:
        raise ValueError(f"{output} holds an earlier run ({', '.join(p.name for p in earlier)}); continue it with "
                         "--resume or replace it with --overwrite (resume=True or overwrite=True in Python)")
    return None


def _base_name(model: str) -> str:
    """What an adapter names as its base: a local folder by its absolute path, a Hub id as it is."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def _write_model(model, config: TrainingConfig, source: Path, target: Path) -> None:
    """A folder to load and generate from: weights, config, generation config and the source's tokenizer and
    processor files. With LoRA the weights have the adapters folded in, and `adapter/` holds the adapters
    alone in PEFT's layout."""
    with lora_merged(model):
        model.save_pretrained(target)
    for name in COMPANION_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    if config.lora is not None:
        save_adapter(model, target / ADAPTER_FOLDER, config.lora.rank, config.lora.alpha, _base_name(config.model))


def _save_checkpoint(folder: Path, write_model, state: dict, write_sharded=None, run=None):
    """A model folder (`write_model`) plus what resuming needs: `state` (the step, the logs and, in one
    process, the optimizer state) and, in a torchrun job, each rank's shards (`write_sharded`). It is
    written under another name and renamed when complete, so an interrupted save leaves no checkpoint."""
    partial = folder.with_name(folder.name + ".partial")
    if is_leader() and partial.exists():
        shutil.rmtree(partial)
    if run is not None:
        run.barrier()
    write_model(partial)
    if write_sharded is not None:
        write_sharded(partial)
        run.barrier()
    if is_leader():
        torch.save(state, partial / STATE_FILE)
        partial.rename(folder)
    if run is not None:
        run.barrier()


def _gathered_model(run, root, model, config: TrainingConfig):
    """On rank 0, a plain copy of a sharded model (the adapters still apart, as in the model it copies), to
    save; None on the other ranks."""
    state = run.gathered(root)
    if state is None:
        return None
    with torch.device("meta"):
        plain = DiffusionGemmaForBlockDiffusion(model.config)
    if config.lora is not None:
        apply_lora(plain, config.lora.rank, config.lora.alpha)
    plain.load_state_dict(state, assign=True)
    plain.model.backbone.reset_computed_buffers()
    plain.generation_config = model.generation_config
    return plain


def train(config: TrainingConfig, resume: bool = False, overwrite: bool = False,
          progress: Progress | None = None) -> dict:
    """Runs the recipe; returns the per-step history (loss, learning rate) and the evaluations. `resume`
    continues from the output folder's newest checkpoint; an output folder that holds an earlier run is
    otherwise refused, unless `overwrite` (which deletes that run's checkpoints and final model). Under
    torchrun with several processes, the model is sharded with FSDP2 (`distributed/fsdp.py`); rank 0 alone
    reports and writes what is not sharded."""
    output = Path(config.output)
    checkpoint = _check_start(config, output, resume, overwrite)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = _device(config)
    # --- FSDP2: one of several torchrun processes.
    run = None
    if fsdp.wanted():
        run = fsdp.ShardedRun(device, config.gradient_accumulation,
                              functools.partial(block_diffusion_loss, fixed_passes=True))
    if checkpoint is not None and (run is not None) != (checkpoint / fsdp.SHARDED_FOLDER).is_dir():
        raise ValueError(f"{checkpoint} was written by " + ("one process: resume it without torchrun" if run
                         else "a torchrun job: resume it under torchrun with the same number of processes"))
    source = Path(resolve_folder(config.model))
    # A full fine-tune resumes from the checkpoint's weights; LoRA from the base and the checkpoint's adapters.
    start = checkpoint if checkpoint is not None and config.lora is None else source
    # A full fine-tune is sharded before its weights are read: each rank reads only its own shards.
    sharding = run.shard if run is not None and config.lora is None else None
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(start, dtype=torch.float32, device=device,
                                                            sharding=sharding)
    if config.lora is not None:
        # The adapters' random start follows from the seed: the same run twice, and on every rank of a job.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            apply_lora(model, config.lora.rank, config.lora.alpha)
        if checkpoint is not None and run is None:
            load_adapter_weights(model, checkpoint / ADAPTER_FOLDER)
    model.train()
    if config.activation_checkpointing:
        checkpoint_feed_forward(model)
    if run is not None and run.root is None:
        run.shard(model)
    root = run.root if run is not None else None
    processor = AutoProcessor.from_pretrained(source)
    pad = processor.tokenizer.pad_token_id
    canvas, positions = model.config.canvas_length, model.config.text_config.max_position_embeddings
    examples = canvas_examples(read_chats(config.train_data), processor, canvas, positions)
    held_out = (canvas_examples(read_chats(config.eval_data), processor, canvas, positions)
                if config.eval_data else None)
    optimizer = _optimizer(model, config)
    progress = progress or Progress(config.steps, sys.stderr if is_leader() else None)

    step, history, evaluations = 0, [], []
    if checkpoint is not None:
        state = torch.load(checkpoint / STATE_FILE, map_location=device, weights_only=True)
        if run is not None:
            run.load_state(root, optimizer, checkpoint)
        else:
            optimizer.load_state_dict(state["optimizer"])
        step, history, evaluations = state["step"], state["history"], state["evaluations"]
        progress.message(f"resuming from {checkpoint} at step {step} of {config.steps}")
    elif overwrite and is_leader():
        for earlier in _earlier_run(output):
            shutil.rmtree(earlier)
    if is_leader():
        output.mkdir(parents=True, exist_ok=True)
        (output / "recipe.json").write_text(json.dumps(asdict(config), indent=2) + "\n")

    def write_model(target: Path) -> None:
        plain = model if run is None else _gathered_model(run, root, model, config)
        if plain is not None:
            _write_model(plain, config, source, target)

    def save(folder: Path) -> None:
        state = {"step": step, "history": history, "evaluations": evaluations}
        if run is None:
            _save_checkpoint(folder, write_model, {**state, "optimizer": optimizer.state_dict()})
        else:
            _save_checkpoint(folder, write_model, state, lambda f: run.save_state(root, optimizer, f), run)

    def held_out_metrics() -> dict:
        if run is None:
            return evaluate(model, held_out, config.batch_size, pad)
        root.unshard()  # the root unit's weights, which no call of its forward gathers here
        try:
            return evaluate(model, held_out, config.batch_size, pad)
        finally:
            root.reshard()

    per_epoch = -(-len(examples) // config.batch_size)
    objective = config.objective()
    first_step = step
    shuffled = (-1, [])  # (epoch, its batches), drawn again only when an epoch begins
    micro_batches = run.micro_batches(config.gradient_accumulation) if run else range(config.gradient_accumulation)
    while step < config.steps:
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        parts_sum, tokens = {}, 0
        for micro in micro_batches:
            index = step * config.gradient_accumulation + micro
            epoch, position = divmod(index, per_epoch)
            if shuffled[0] != epoch:
                shuffled = (epoch, epoch_batches(examples, config.batch_size, config.seed, epoch))
            batch = collate([examples[i] for i in shuffled[1][position]], pad).to(device)
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
            with _autocast(device):
                if run is None:
                    loss, parts = block_diffusion_loss(model, batch, objective, generator)
                else:
                    loss, parts = root(batch, objective, generator)
            if run is None:
                (loss / config.gradient_accumulation).backward()
            else:
                # The ranks' gradients are reduced once a step, on each rank's last micro-batch.
                root.set_requires_gradient_sync(micro == micro_batches[-1])
                (loss * run.loss_scale(config.gradient_accumulation)).backward()
            for name, value in parts.items():
                parts_sum[name] = parts_sum.get(name, 0.0) + value / config.gradient_accumulation
            tokens += int(batch.attention_mask.sum()) + batch.target.numel()
        if run is not None:
            parts_sum, tokens = _summed_over_ranks(run, parts_sum, tokens)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.max_grad_norm)
        optimizer.step()
        step += 1
        history.append({"step": step, "lr": lr, **parts_sum})
        progress.update(step, first_step, parts_sum["diffusion_loss"], lr, tokens,
                        show=step % config.log_every == 0 or step == config.steps)
        if held_out and config.eval_every and step % config.eval_every == 0 and step < config.steps:
            evaluations.append({"step": step, **held_out_metrics()})
            progress.message(f"eval at step {step}: {json.dumps(evaluations[-1])}")
        if config.save_every and step % config.save_every == 0 and step < config.steps:
            save(output / f"checkpoint-{step}")

    # A run resumed at its last step trained nothing, and its checkpoint is there already.
    if step > first_step:
        save(output / f"checkpoint-{step}")
    if held_out:
        evaluations.append({"step": step, **held_out_metrics()})
        progress.message(f"eval at step {step}: {json.dumps(evaluations[-1])}")
    write_model(output / "final")
    result = {"history": history, "evaluations": evaluations}
    if is_leader():
        (output / "final" / "training_log.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _summed_over_ranks(run, parts_sum: dict, tokens: int) -> tuple[dict, int]:
    """A step's loss parts and token count over all ranks' micro-batches (a part counts where any rank has it)."""
    names = ("diffusion_loss", "encoder_loss")
    summed = run.sum([parts_sum.get(n, 0.0) for n in names] + [float(n in parts_sum) for n in names] + [tokens])
    parts = {n: summed[i] for i, n in enumerate(names) if summed[len(names) + i]}
    return parts, int(summed[-1])
