"""The `quantization_config` entry of a quantized checkpoint's config.json: what `save_pretrained` writes and
which entries loading reads.

Tensors: a quantized weight is stored under the full-precision weight's name (its codes: F8_E4M3, I8, or U8
holding two int4 codes) next to `<name>_scale` (for a Linear, `<module>.weight_scale`); a weight with no
`_scale` tensor is stored unquantized. The config entry says how to read the codes:
- fp8 and int8: compressed-tensors (`quant_method: compressed-tensors`, format `float-quantized` or
  `int-quantized`, one config group of 8-bit symmetric weights). Checkpoints made by llm-compressor in these
  formats (e.g. FP8-dynamic) load too: their activation settings are not applied, activations stay in the
  compute dtype, and their ignore list needs no reading, since an unquantized weight has no scale tensor.
- int4: this engine's own, `quant_method: diffusiongemma`, `scheme: int4`, `group_size`, the packing of
  `model.quantization` (compressed-tensors packs int4 codes into int32 words, another layout).
"""

from __future__ import annotations

from ..model.quantization import Scheme

COMPRESSED_TENSORS = "compressed-tensors"
OWN = "diffusiongemma"
# The compressed-tensors format and weight type of each 8-bit scheme.
_COMPRESSED = {"fp8": ("float-quantized", "float"), "int8": ("int-quantized", "int")}


def quantization_config(scheme: Scheme) -> dict:
    if scheme.name == "int4":
        return {"quant_method": OWN, "scheme": "int4", "group_size": scheme.group_size}
    form, kind = _COMPRESSED[scheme.name]
    weights = {"num_bits": 8, "type": kind, "symmetric": True, "strategy": "channel", "dynamic": False}
    return {"quant_method": COMPRESSED_TENSORS, "format": form, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}, "ignore": []}


def stored_scheme(config: dict | None) -> Scheme | None:
    """The scheme a checkpoint's `quantization_config` (None: absent) says its quantized weights are in."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError("config.json: `quantization_config` is not a mapping")
    method = config.get("quant_method")
    if method == OWN and config.get("scheme") == "int4" and isinstance(config.get("group_size"), int):
        return Scheme("int4", config["group_size"])
    if method == COMPRESSED_TENSORS:
        form = config.get("format")
        groups = config.get("config_groups") or {}
        for name, (expected_form, kind) in _COMPRESSED.items():
            weights = [group.get("weights") or {} for group in groups.values() if isinstance(group, dict)]
            if form == expected_form and weights and all(w.get("num_bits") == 8 and w.get("type") == kind
                                                         and w.get("symmetric", True) for w in weights):
                return Scheme(name)
        raise ValueError(f"config.json: compressed-tensors format {form!r} with these weight settings is not "
                         "supported; this engine reads float-quantized (fp8) and int-quantized (int8) 8-bit "
                         "symmetric weights")
    raise ValueError(f"config.json: quantization_config with quant_method {method!r} is not supported; this engine "
                     f"reads {COMPRESSED_TENSORS} (fp8, int8) and its own int4 checkpoints")
