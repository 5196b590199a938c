"""ComfyUI single-file text encoders (``umt5_xxl_fp16.safetensors``, ``..._bf16``, ``..._fp8_e4m3fn``,
``..._fp8_e4m3fn_scaled``), the files ComfyUI's CLIPLoader reads for Wan 2.x.

Layout, checked against comfyanonymous/ComfyUI:

* ``comfy/text_encoders/t5.py``: ComfyUI's T5 is built from the same module names as transformers'
  (``shared``, ``encoder.block[i].layer[0].SelfAttention.{q,k,v,o,relative_attention_bias}``,
  ``layer[0].layer_norm``, ``layer[1].DenseReluDense.{wi_0,wi_1,wo}``, ``layer[1].layer_norm``,
  ``encoder.final_layer_norm``), so the file's names are ours; ``model_type == "umt5"`` gives every
  block its own bias table. ``comfy/text_encoders/umt5_config_xxl.json`` is umt5-xxl's config.
* ``comfy/sd.py``: a T5 text encoder is recognised by ``encoder.block.23.layer.1.DenseReluDense.wi_1.weight``
  (width 4096: xxl); for Wan it reads the tokenizer from the file's ``spiece_model`` tensor (the
  serialised sentencepiece model, uint8) and ``t5_xxl_detect`` takes the compute dtype from
  ``encoder.final_layer_norm.weight`` and the legacy fp8 marker from the ``scaled_fp8`` key.
* ``comfy/ops.py`` (``scaled_fp8_ops``): legacy "scaled fp8" stores each linear weight in
  float8_e4m3fn plus a per-tensor fp32 ``<layer>.scale_weight``; the weight is
  ``weight.to(dtype) * scale_weight``. ``<layer>.scale_input`` only scales activations for fp8
  matrix multiplication on GPUs and is not part of the weight.
* ``comfy/utils.py`` (``convert_old_quants``) and ``comfy/ops.py`` (``mixed_precision_ops``): the
  current layout renames ``scale_weight`` to ``weight_scale`` and ``scale_input`` to ``input_scale``,
  and describes each quantised layer in a ``<layer>.comfy_quant`` uint8 JSON tensor (or the
  ``_quantization_metadata`` entry of the safetensors header), e.g. ``{"format": "float8_e4m3fn"}``.

fp8 weights stay fp8 in memory (``umt5_fast.quant.Float8Weight``, scale kept per tensor) and are
expanded one layer at a time; everything else is used as stored (memory-mapped).
"""
import json

from umt5_fast.formats import common
from umt5_fast.loading import CheckpointError, _numel

NAME = "comfy"

TENSOR_NAMES = common.NameTable({name: name for name in (
    common.EMBEDDING,
    common.ATTENTION_NORM, common.Q, common.K, common.V, common.O, common.RELATIVE_BIAS,
    common.FFN_NORM, common.WI_0, common.WI_1, common.WO,
    common.FINAL_NORM,
)})

WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # legacy scaled_fp8, current comfy_quant
# Entries that describe the file rather than hold model weights.
NON_WEIGHT_NAMES = ("scaled_fp8", "spiece_model")
NON_WEIGHT_SUFFIXES = (".comfy_quant", ".scale_input", ".input_scale")
SUPPORTED_QUANT_FORMATS = ("float8_e4m3fn", "float8_e5m2")


def claims(names) -> bool:
    return TENSOR_NAMES.knows_any(names)


def read(path, file: common.TensorFile, config=None) -> common.FormatCheckpoint:
    _check_quant_formats(file)
    weights, scales = [], {}
    for name in file.shapes:
        if name in NON_WEIGHT_NAMES or name.endswith(NON_WEIGHT_SUFFIXES):
            continue
        if name.endswith(WEIGHT_SCALE_SUFFIXES):
            scales[name.rsplit(".", 1)[0] + ".weight"] = name
        else:
            weights.append(name)
    for scale in scales.values():
        if _numel(file.shapes[scale]) != 1:
            raise CheckpointError(f"{path}: {scale!r} has shape {file.shapes[scale]}; umt5_fast reads one "
                                  "per-tensor fp8 scale per weight (ComfyUI's scaled fp8)")
    # A scale whose weight is absent goes through under its own name: build_model lists it as unexpected.
    weights += [scale for weight, scale in scales.items() if weight not in file.shapes]
    sources, shapes, packed = common.tensor_sources(file, TENSOR_NAMES.rename(weights), scales)
    if config is None:
        config = common.infer_config(path, shapes,
                                     torch_dtype=common.compute_dtype_name(file.dtypes.get(common.FINAL_NORM)))
    return common.FormatCheckpoint(config, sources, shapes, packed)


def _check_quant_formats(file: common.TensorFile):
    """Reject ComfyUI quantisation formats other than per-tensor fp8 (e.g. nvfp4, int8 blockwise)."""
    layers = {}
    if "_quantization_metadata" in file.metadata:
        try:
            layers.update(json.loads(file.metadata["_quantization_metadata"])["layers"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{file.path}: unreadable _quantization_metadata in the header ({exc})") from exc
    for name in file.shapes:
        if name.endswith(".comfy_quant"):
            try:
                layers[name[: -len(".comfy_quant")]] = json.loads(bytes(file.tensor(name).tolist()))
            except ValueError as exc:
                raise CheckpointError(f"{file.path}: tensor {name!r} is not ComfyUI quantisation JSON") from exc
    malformed = sorted(layer for layer, conf in layers.items() if not isinstance(conf, dict))
    if malformed:
        raise CheckpointError(f"{file.path}: the ComfyUI quantisation entries of {malformed} are not JSON "
                              'objects (expected e.g. {"format": "float8_e4m3fn"})')
    unsupported = {layer: conf.get("format") for layer, conf in layers.items()
                   if conf.get("format") not in SUPPORTED_QUANT_FORMATS}
    if unsupported:
        raise CheckpointError(f"{file.path}: ComfyUI quantisation formats other than "
                              f"{' / '.join(SUPPORTED_QUANT_FORMATS)} are not supported: {unsupported}")

