"""Reading and writing checkpoints in the reference's format (config.json, generation_config.json,
model.safetensors or shards with model.safetensors.index.json).

Loading builds the model without memory, allocates each tensor once at its final dtype and device, and
reads the file's bytes straight into it, so the weights are never held twice. Tensor names are the
reference's: the text weights the encoder and decoder share may be stored under either role (or both),
the LM head is the embedding matrix and may be stored or not.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator

import torch
from torch import nn

from ..engine.generate import DiffusionGemmaGenerationConfig
from ..model.config import DiffusionGemmaConfig, read_json

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "float64": torch.float64}
ENCODER_TEXT = "model.encoder.language_model."
DECODER = "model.decoder."
VISION_TOWER = "model.encoder.vision_tower."
EMBED_VISION = "model.encoder.embed_vision."
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PATTERNS = [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


class SafetensorsFile:
    """The tensors of one safetensors file, as `safetensors.safe_open` reads and checks its header, with
    reads of single tensors straight into caller-provided memory."""

    def __init__(self, path: str):
        from safetensors import SafetensorError, safe_open

        self.path = path
        self.entries = {}
        try:
            with safe_open(path, framework="pt") as handle:
                dtypes = {}
                begin = 0
                # safe_open has checked that the tensors lie back to back, in this order, and fill the data.
                for name in handle.offset_keys():
                    piece = handle.get_slice(name)
                    kind, shape = piece.get_dtype(), tuple(piece.get_shape())
                    if kind not in dtypes:
                        dtypes[kind] = _torch_dtype(handle, name, kind, shape, path)
                    self.entries[name] = (dtypes[kind], shape, begin)
                    begin += math.prod(shape) * dtypes[kind].itemsize
        except SafetensorError as error:
            raise ValueError(f"{path} is corrupt or truncated: {error}") from None
        with open(path, "rb") as handle:
            self.data_start = 8 + int.from_bytes(handle.read(8), "little")
        if self.data_start + begin != os.path.getsize(path):
            raise ValueError(f"{path} holds tensors whose dtypes this loader cannot size")

    def read(self, name: str) -> torch.Tensor:
        """A fresh CPU tensor holding the stored values."""
        dtype, shape, begin = self.entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        with open(self.path, "rb") as handle:
            handle.seek(self.data_start + begin)
            if tensor.numel():
                handle.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
        return tensor

    def read_into(self, name: str, target: torch.Tensor, part: tuple[int, int, int] | None = None) -> None:
        """Fill `target` (any dtype, any device) with the stored values, staging only when needed. `part`
        (dim, start, stop): only that slice along one dimension, read piece by piece from the file (a
        tensor-parallel rank's shard)."""
        dtype, shape, begin = self.entries[name]
        if part is None:
            pieces = [(self.data_start + begin, math.prod(shape) * dtype.itemsize)]
        else:
            dim, start, stop = part
            inner = math.prod(shape[dim + 1:]) * dtype.itemsize
            pieces = [(self.data_start + begin + (outer * shape[dim] + start) * inner, (stop - start) * inner)
                      for outer in range(math.prod(shape[:dim]))]
        if target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous():
            into = memoryview(target.view(-1).view(torch.uint8).numpy()) if target.numel() else None
            with open(self.path, "rb") as handle:
                written = 0
                for offset, size in pieces:
                    if size:
                        handle.seek(offset)
                        handle.readinto(into[written:written + size])
                    written += size
        else:
            staged = torch.empty(target.shape, dtype=dtype)
            self.read_into(name, staged, part)
            target.copy_(staged)


def _torch_dtype(handle, name: str, kind: str, shape: tuple, path: str) -> torch.dtype:
    """The torch dtype safetensors gives tensors of dtype `kind`, from an empty slice of `name` (or the
    tensor itself when it has no dimension to slice, so one element)."""
    try:
        return (handle.get_slice(name)[:0] if shape else handle.get_tensor(name)).dtype
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{path}: tensor {name!r} has dtype {kind}, which PyTorch cannot hold") from None


def resolve_folder(path_or_repo_id: str | os.PathLike, patterns: list[str] = HUB_PATTERNS, **hub_kwargs) -> str:
    """A local folder as is; otherwise a Hugging Face repo id, whose files matching `patterns` are
    fetched or found in the hub cache."""
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path} is a file; pass the checkpoint folder that holds config.json")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path):
        raise FileNotFoundError(f"no checkpoint folder at {path}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(path, allow_patterns=patterns, **hub_kwargs)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"{path} is neither a local folder nor in the Hugging Face cache, and it "
                                "could not be downloaded (offline mode or no network)") from None
    except HfHubHTTPError as error:
        raise FileNotFoundError(f"could not fetch {path} from the Hugging Face Hub: {error}") from None


def _open_weights(folder: str) -> dict[str, SafetensorsFile]:
    """Tensor name -> the file that holds it."""
    index_path = os.path.join(folder, INDEX_NAME)
    if os.path.exists(index_path):
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path} is corrupt: no valid `weight_map`")
        files = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(folder, shard)
            if not os.path.exists(shard_path):
                raise FileNotFoundError(f"missing checkpoint shard {shard_path} (listed in {INDEX_NAME})")
            files[shard] = SafetensorsFile(shard_path)
        located = {}
        for name, shard in weight_map.items():
            if name not in files[shard].entries:
                raise ValueError(f"{INDEX_NAME} places tensor {name!r} in {shard}, which does not hold it")
            located[name] = files[shard]
        return located
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no weights in {folder}: expected {WEIGHTS_NAME} or {INDEX_NAME}")
    weights = SafetensorsFile(path)
    return {name: weights for name in weights.entries}


class StoredTensor:
    """Where a tensor lies: its file and its name there."""

    def __init__(self, file: SafetensorsFile, name: str):
        self.file, self.name = file, name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.file.entries[self.name][1]

    @property
    def dtype(self) -> torch.dtype:
        return self.file.entries[self.name][0]

    def read(self) -> torch.Tensor:
        return self.file.read(self.name)

    def read_into(self, target: torch.Tensor, part: tuple[int, int, int] | None = None) -> None:
        self.file.read_into(self.name, target, part)


def _stored_tensors(folder: str) -> dict[str, StoredTensor]:
    """The checkpoint's tensors by their full names; a checkpoint of the bare DiffusionGemmaModel names
    them without the leading `model.`."""
    located = _open_weights(folder)
    bare = not any(name.startswith("model.") or name == "lm_head.weight" for name in located)
    return {("model." if bare else "") + name: StoredTensor(file, name) for name, file in located.items()}


def _module_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, nn.Module, str]]:
    """(name, tensor, owner module, attribute) for every parameter and persistent buffer."""
    for module_name, owner in module.named_modules():
        for attr, tensor in list(owner._parameters.items()) + list(owner._buffers.items()):
            if tensor is not None and attr not in owner._non_persistent_buffers_set:
                yield (f"{module_name}.{attr}" if module_name else attr), tensor, owner, attr


def checkpoint_tensors(model: nn.Module) -> Iterator[tuple[str, list[str], torch.Tensor, nn.Module, str]]:
    """(stored name, other names it may be stored under, tensor, owner module, attribute) for every
    tensor of the model; the stored names are the reference's."""
    core = model.model if hasattr(model, "model") else model
    for name, tensor, owner, attr in _module_tensors(core.backbone):
        if attr in ("encoder_layer_scalar", "decoder_layer_scalar"):
            role = ENCODER_TEXT if attr.startswith("encoder") else DECODER
            yield f"{role}{name.rpartition('.')[0]}.layer_scalar", [], tensor, owner, attr
        else:
            aliases = [ENCODER_TEXT + name] + (["lm_head.weight"] if name == "embed_tokens.weight" else [])
            yield DECODER + name, aliases, tensor, owner, attr
    parts = [(DECODER + "self_conditioning.", core.decoder.self_conditioning)]
    if core.encoder.vision_tower is not None:
        parts += [(VISION_TOWER, core.encoder.vision_tower), (EMBED_VISION, core.encoder.embed_vision)]
    for prefix, module in parts:
        for name, tensor, owner, attr in _module_tensors(module):
            yield prefix + name, [], tensor, owner, attr


def _target_dtype(dtype, config: DiffusionGemmaConfig, stored: torch.dtype) -> torch.dtype:
    if dtype is None or dtype == "auto":
        named = config.extra.get("dtype") or config.extra.get("torch_dtype")
        return DTYPE_NAMES.get(named, stored) if isinstance(named, str) else stored
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPE_NAMES)} or 'auto'")
        return DTYPE_NAMES[dtype]
    if dtype not in DTYPE_NAMES.values():
        raise ValueError(f"unsupported dtype {dtype}; choose one of {sorted(DTYPE_NAMES)}")
    return dtype


def _target_device(device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"  # as in `transformers`: a bare number is a GPU's index
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was asked for, but no CUDA device is available")
    return device


# `transformers`' device_map values that split a model or move parts of it off the accelerator.
SPLITTING_MAPS = ("balanced", "balanced_low_0", "sequential")
OFFLOADING = ("disk", "meta")


def _one_device(device, device_map) -> torch.device:
    """The device `device` or a `transformers`-style `device_map` names. A map may name one device only
    (`"auto"`, `"cuda:0"`, `{"": 0}`, or every module on the same device): this engine does not split a model."""
    if device_map is None:
        return _target_device("cpu" if device is None else device)
    if device is not None:
        raise ValueError("pass `device` or `device_map`, not both")
    places = list(device_map.values()) if isinstance(device_map, dict) else [device_map]
    if not places:
        raise ValueError("`device_map` is an empty mapping; name a device, e.g. {'': 0} or 'auto'")
    for place in places:
        if place in SPLITTING_MAPS or place in OFFLOADING:
            raise ValueError(f"device_map {device_map!r} spreads the model over several devices or offloads it; "
                             "this engine runs a model on one device: use 'auto', 'cpu', 'cuda:N' or {'': N}")
    devices = {_target_device(place) for place in places}
    if len(devices) > 1:
        raise ValueError(f"device_map {device_map!r} splits the model across {sorted(map(str, devices))}; this engine "
                         "runs a model on one device: use 'auto', 'cpu', 'cuda:N' or {'': N}")
    return devices.pop()


HUB_ARGUMENTS = ("revision", "cache_dir", "token", "local_files_only", "force_download")


@torch.no_grad()
def load_pretrained(cls, path_or_repo_id, dtype=None, device=None, *, device_map=None, torch_dtype=None,
                    adapter=None, progress=None, tp_plan=None, sharding=None, **hub_kwargs):
    """See `DiffusionGemmaPreTrainedModel.from_pretrained`. `progress`, when given, is called as
    progress(bytes loaded, bytes in all) after each tensor is read. `tp_plan="auto"`: in a torchrun job, the
    model is sharded over all its ranks before its weights are read, each rank reading its own shards only
    (`distributed/tensor_parallel.py`). `sharding`: a function that shards the model, built on the meta
    device, in place (FSDP2's units, `distributed/fsdp.py`), with the same effect."""
    unknown = sorted(set(hub_kwargs) - set(HUB_ARGUMENTS))
    if unknown:
        raise ValueError(f"unknown from_pretrained arguments {unknown}; besides `dtype`, `device` (or `device_map`) "
                         f"and `adapter` it takes {list(HUB_ARGUMENTS)}")
    if torch_dtype is not None:
        if dtype is not None:
            raise ValueError("pass `dtype` or its old name `torch_dtype`, not both")
        dtype = torch_dtype
    device = _one_device(device, device_map)
    folder = resolve_folder(path_or_repo_id, **hub_kwargs)
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        if os.path.exists(os.path.join(folder, ADAPTER_CONFIG)):
            raise ValueError(f"{folder} holds a LoRA adapter, not a model: load the base model it was trained on "
                             f"with adapter={folder!r}")
        raise FileNotFoundError(f"no config.json in {folder}")
    config = DiffusionGemmaConfig.from_json_file(config_path)
    located = _stored_tensors(folder)
    embed = next((n for n in (DECODER + "embed_tokens.weight", ENCODER_TEXT + "embed_tokens.weight",
                              "lm_head.weight") if n in located), None)
    dtype = _target_dtype(dtype, config, located[embed].dtype if embed else torch.float32)

    with torch.device("meta"):
        model = cls(config)
    # --- tensor parallelism (distributed/): shard the meta model, then each rank allocates its share only.
    if tp_plan is not None:
        from ..distributed import runtime, tensor_parallel

        if tp_plan != "auto":
            raise ValueError(f"unknown tp_plan {tp_plan!r}; the one plan is 'auto'")
        if adapter is not None:
            raise ValueError("a LoRA adapter cannot be merged into a tensor-parallel model; merge it first "
                             "(load it in one process and save_pretrained)")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        tensor_parallel.parallelize(model, runtime.start(device.type))
    if sharding is not None:
        sharding(model)
    model.to(dtype).to_empty(device=device)
    model.eval()

    used, missing = set(), []
    tensors = list(checkpoint_tensors(model))
    total, loaded = sum(tensor.nbytes for _, _, tensor, _, _ in tensors), 0
    for name, aliases, tensor, module, attr in tensors:
        stored = [n for n in [name, *aliases] if n in located]
        if not stored:
            missing.append(name)
            continue
        used.update(stored)
        for source in stored:
            if located[source].shape != tuple(tensor.shape):
                raise ValueError(f"tensor {source!r} has shape {list(located[source].shape)} in the checkpoint, "
                                 f"but the config implies {list(tensor.shape)}")
        shard = _local_part(tensor)
        target, part = shard if shard is not None else (tensor, None)
        located[stored[0]].read_into(target, part)
        for copy in stored[1:]:
            # One backbone serves both roles, so copies stored under both must agree.
            other = torch.empty(target.shape, dtype=target.dtype, device=target.device)
            located[copy].read_into(other, part)
            if not torch.equal(other, target):
                raise ValueError(f"the checkpoint stores different values under {stored[0]!r} and {copy!r}; "
                                 "this engine shares one copy between the encoder and the decoder")
        if progress is not None:
            loaded += tensor.nbytes
            progress(loaded, total)
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors: {_listing(missing)}")

    unexpected = sorted(set(located) - used)
    if unexpected:
        raise ValueError(f"the checkpoint holds {len(unexpected)} tensors this model does not have: "
                         f"{_listing(unexpected)}")
    core = model.model if hasattr(model, "model") else model
    core.backbone.reset_computed_buffers()
    if adapter is not None:
        from ..training.lora import merge_adapter

        merge_adapter(model, resolve_folder(adapter, ADAPTER_PATTERNS))

    generation_path = os.path.join(folder, "generation_config.json")
    if hasattr(model, "generation_config") and os.path.exists(generation_path):
        model.generation_config = DiffusionGemmaGenerationConfig.from_pretrained(generation_path)
    return model


def _local_part(tensor: torch.Tensor):
    """A sharded model's share of `tensor` on this rank (see `runtime.local_part`); None for a whole tensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return None
    from ..distributed.runtime import local_part

    return local_part(tensor)


def _listing(names: list[str], shown: int = 8) -> str:
    listed = ", ".join(names[:shown])
    return listed + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")


def save_pretrained(model, folder, max_shard_size: int | str = "5GB") -> None:
    """Writes the reference's format; text weights shared by encoder and decoder are stored once."""
    from huggingface_hub import save_torch_state_dict

    os.makedirs(folder, exist_ok=True)
    core = model.model if hasattr(model, "model") else model
    # One name per tensor, the decoder's for the shared text weights, as the reference stores them. Handed
    # several names of one tensor, the hub would keep the alphabetically first: `lm_head.weight` for the
    # embedding matrix, which the reference does not store.
    tensors = {name: tensor.detach().to("cpu") for name, _, tensor, _, _ in checkpoint_tensors(model)}
    try:
        # One file, or shards and their index; the folder's earlier weight files are deleted first.
        save_torch_state_dict(tensors, folder, max_shard_size=max_shard_size)
    except ValueError as error:
        # Given one name per tensor, the hub raises ValueError only for a size it cannot read.
        raise ValueError(f"`max_shard_size` must be bytes or a string like '5GB', got {max_shard_size!r} "
                         f"({error})") from None

    config = core.config.to_dict()
    config["dtype"] = str(core.backbone.embed_tokens.weight.dtype).removeprefix("torch.")
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
    if hasattr(model, "generation_config"):
        model.generation_config.save_pretrained(folder)
