"""Reading and writing checkpoints in the reference's format (config.json, generation_config.json,
model.safetensors or shards with model.safetensors.index.json).

Loading builds the model without memory, allocates each tensor once at its final dtype and device, and
reads the file's bytes straight into it, so the weights are never held twice. Tensor names are the
reference's: the text weights the encoder and decoder share may be stored under either role (or both),
the LM head is the embedding matrix and may be stored or not.

Quantized weights (`model.quantization`): asked for with `quantization`, each weight is read into a temporary
and quantized as it is read (an expert at a time), so loading peaks near the quantized size plus one tensor;
stored quantized (`hf.quantized_format`), the codes and scales are read as they are, or, for fp8 on a device
without fp8 support, dequantized to the compute dtype as they are read.
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
from ..model.quantization import (
    FP8,
    INT8,
    QuantizedWeight,
    Scheme,
    check_device,
    dequantize,
    fp8_supported,
    parse_scheme,
    quantizable,
    quantize,
    replace,
    weight_scheme,
)
from .quantized_format import quantization_config, stored_scheme

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
# Weights quantized as they are read on the CPU go through float32 temporaries of at most this many values at a
# time (measured on the `small` preset: with 2**16 the load peaks 1.26x the int4 weights, with 2**13 1.17x).
QUANTIZE_BLOCK = 2**13


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

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """A fresh CPU tensor holding the stored values, or only those of `tensor[index]`."""
        dtype, shape, begin = self.entries[name]
        if index is not None:
            shape = shape[1:]
            begin += index * math.prod(shape) * dtype.itemsize
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

    def read(self, index: int | None = None) -> torch.Tensor:
        return self.file.read(self.name, index)

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
                if isinstance(owner, QuantizedWeight):
                    yield module_name + owner.stored_suffix(attr), tensor, owner, attr
                else:
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
                    adapter=None, quantization=None, progress=None, tp_plan=None, sharding=None, **hub_kwargs):
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
    scheme, stored = _scheme(quantization, config, device, folder)
    if adapter is not None and scheme is not None:
        raise ValueError("a LoRA adapter cannot be folded into quantized weights; load the model unquantized, or "
                         "merge the adapter into a full-precision checkpoint first")
    if (scheme is not None or stored is not None) and (tp_plan is not None or sharding is not None):
        raise ValueError("quantized weights cannot be sharded over a torchrun job (tp_plan, FSDP); load the model "
                         "unquantized from a full-precision checkpoint")

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
    model.to(dtype)
    if scheme is not None:
        _put_quantized_weights(model, scheme, located, stored)
    model.to_empty(device=device)
    model.eval()

    used, missing = set(), []
    tensors = list(checkpoint_tensors(model))
    total, loaded = sum(tensor.nbytes for _, _, tensor, _, _ in tensors), 0
    for name, aliases, tensor, module, attr in tensors:
        if isinstance(module, QuantizedWeight) and attr == "weight_scale":
            continue  # read or computed with its codes
        stored_names = [n for n in [name, *aliases] if n in located]
        if not stored_names:
            missing.append(name)
            continue
        used.update(stored_names)
        scales = [n + "_scale" for n in stored_names if n + "_scale" in located]
        used.update(scales)
        if isinstance(module, QuantizedWeight) and attr == "weight":
            if scales:
                _read_quantized(module, [located[n] for n in stored_names], [located[n] for n in scales])
            else:
                _quantize_as_read(module, [located[n] for n in stored_names], device)
            loaded += module.weight_scale.nbytes
        else:
            _check_shapes([located[n] for n in stored_names], tuple(tensor.shape))
            shard = _local_part(tensor)
            target, part = shard if shard is not None else (tensor, None)
            if scales:
                # Stored quantized, kept full precision (fp8 where the device has no fp8): dequantized as read.
                tensor.copy_(dequantize(located[stored_names[0]].read(), located[scales[0]].read(), tensor.dtype))
            else:
                located[stored_names[0]].read_into(target, part)
            for copy in stored_names[1:]:
                # One backbone serves both roles, so copies stored under both must agree.
                if scales:
                    same = torch.equal(located[copy].read(), located[stored_names[0]].read())
                else:
                    other = torch.empty(target.shape, dtype=target.dtype, device=target.device)
                    located[copy].read_into(other, part)
                    same = torch.equal(other, target)
                if not same:
                    _disagree(stored_names[0], copy)
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


def _scheme(quantization: str | None, config: DiffusionGemmaConfig, device: torch.device,
            folder: str) -> tuple[Scheme | None, Scheme | None]:
    """(the scheme the model's weights are held in, None for full precision; the scheme the checkpoint
    stores, None for none)."""
    requested = parse_scheme(quantization) if quantization is not None else None
    stored = stored_scheme(config.extra.get("quantization_config"))
    if requested is not None and stored is not None and requested != stored:
        raise ValueError(f"{folder} holds {stored} weights; load it with quantization={str(stored)!r} or none")
    if requested is None and stored is not None and stored.name == "fp8" and not fp8_supported(device):
        return None, stored
    scheme = requested or stored
    if scheme is not None:
        check_device(scheme, device)
    return scheme, stored


def _put_quantized_weights(model: nn.Module, scheme: Scheme, located: dict[str, StoredTensor],
                           stored: Scheme | None) -> None:
    """Replaces the quantizable weights of a model built on the meta device with empty quantized ones: all of
    them when quantizing as they are read (each in `weight_scheme`'s scheme), those the checkpoint stores with
    scales when it stores `stored` (each in the scheme its codes' dtype says: an int4 checkpoint holds int8
    weights too)."""
    if stored is None:
        for owner, attr in quantizable(model):
            replace(owner, attr, weight_scheme(owner, attr, scheme))
        return
    names = {(id(owner), attr): [name, *aliases] for name, aliases, _, owner, attr in checkpoint_tensors(model)}
    by_codes = {torch.int8: INT8, FP8: Scheme("fp8"), **({torch.uint8: stored} if stored.name == "int4" else {})}
    for owner, attr in quantizable(model):
        target = getattr(owner, attr)
        candidates = names[(id(target), "weight") if isinstance(target, nn.Linear) else (id(owner), attr)]
        stored_names = [n for n in candidates if n + "_scale" in located]
        if not stored_names:
            continue  # the checkpoint keeps this weight unquantized
        codes = located[stored_names[0]]
        if codes.dtype not in by_codes:
            raise ValueError(f"tensor {codes.name!r} holds {codes.dtype} codes, which a {stored} checkpoint "
                             "does not store")
        replace(owner, attr, by_codes[codes.dtype], located[stored_names[0] + "_scale"].shape)


def _check_shapes(sources: list[StoredTensor], shape: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
    for source in sources:
        if source.shape != shape:
            raise ValueError(f"tensor {source.name!r} has shape {list(source.shape)} in the checkpoint, "
                             f"but the config implies {list(shape)}")
        if dtype is not None and source.dtype != dtype:
            raise ValueError(f"tensor {source.name!r} is stored as {source.dtype}, but its quantization "
                             f"stores {dtype}")


def _disagree(first: str, copy: str) -> None:
    raise ValueError(f"the checkpoint stores different values under {first!r} and {copy!r}; "
                     "this engine shares one copy between the encoder and the decoder")


def _read_quantized(module: QuantizedWeight, codes: list[StoredTensor], scales: list[StoredTensor]) -> None:
    for sources, target in ((codes, module.weight), (scales, module.weight_scale)):
        _check_shapes(sources, tuple(target.shape), target.dtype)
        sources[0].read_into(target)
        for copy in sources[1:]:
            if not torch.equal(copy.read(), sources[0].read()):
                _disagree(sources[0].name, copy.name)


def _quantize_as_read(module: QuantizedWeight, sources: list[StoredTensor], device: torch.device) -> None:
    """Quantizes a full-precision stored weight into `module`, the experts' weights an expert at a time, read
    from the file one by one, so that the temporaries stay small. On the CPU, where they share the model's
    memory, each matrix goes in blocks of rows (each row's scales are its own); a GPU takes a matrix at once,
    which costs far fewer launches."""
    _check_shapes(sources, tuple(module.shape))
    experts = [None] if len(module.shape) == 2 else range(module.shape[0])
    rows = max(QUANTIZE_BLOCK // module.shape[-1], 1) if device.type == "cpu" else module.shape[-2]
    for index in experts:
        matrix = sources[0].read(index)
        for copy in sources[1:]:
            if not torch.equal(copy.read(index), matrix):
                _disagree(sources[0].name, copy.name)
        codes = module.weight if index is None else module.weight[index]
        scales = module.weight_scale if index is None else module.weight_scale[index]
        for start in range(0, matrix.shape[0], rows):
            block_codes, block_scales = quantize(matrix[start:start + rows].to(device), module.scheme)
            codes[start:start + rows].copy_(block_codes)
            scales[start:start + rows].copy_(block_scales)


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
    config.pop("quantization_config", None)
    schemes = {module.scheme for module in model.modules() if isinstance(module, QuantizedWeight)}
    if schemes:
        # One scheme besides int8, which an int4 model holds too (`weight_scheme`).
        config["quantization_config"] = quantization_config(max(schemes, key=lambda scheme: scheme != INT8))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
    if hasattr(model, "generation_config"):
        model.generation_config.save_pretrained(folder)
