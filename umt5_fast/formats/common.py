"""What the single-file formats share: name tables, tensor files, fp8 sources and config inference.

Our tensor names are transformers' (``shared.weight``, ``encoder.block.{i}.layer.0.SelfAttention.q.weight``,
...). A format's names that its table does not know are passed through unchanged, so that
``umt5_fast.loading.build_model`` lists them as unexpected tensors next to the missing ones.
"""
import re
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Set

import torch

from umt5_fast.config import UMT5Config
from umt5_fast.loading import CheckpointError, SafetensorsFile, _load_bin
from umt5_fast.quant import Float8Weight

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# Our names of the tensors the encoder is built from (block tensors with ``{i}``).
EMBEDDING = "shared.weight"
BLOCK = "encoder.block.{i}."
ATTENTION_NORM = "encoder.block.{i}.layer.0.layer_norm.weight"
Q, K, V, O = (f"encoder.block.{{i}}.layer.0.SelfAttention.{p}.weight" for p in "qkvo")
RELATIVE_BIAS = "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"
FFN_NORM = "encoder.block.{i}.layer.1.layer_norm.weight"
WI_0, WI_1, WO = (f"encoder.block.{{i}}.layer.1.DenseReluDense.{p}.weight" for p in ("wi_0", "wi_1", "wo"))
FINAL_NORM = "encoder.final_layer_norm.weight"


class FormatCheckpoint(NamedTuple):
    """What ``read`` returns: ``build_model``'s inputs plus the config.

    ``sources``: our name -> callable returning a tensor or, for names in ``packed``, an object with
    ``dequantize(dtype)`` (a ``umt5_fast.quant.PackedWeight`` stays packed in a linear layer).
    ``shapes``: our name -> the logical (dequantised) shape.
    """
    config: UMT5Config
    sources: Dict[str, Callable]
    shapes: Dict[str, tuple]
    packed: Set[str]


def _block_pattern(template: str):
    return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)"))


def _translate(patterns, name: str) -> Optional[str]:
    for pattern, target in patterns:
        match = pattern.fullmatch(name)
        if match:
            return target.format(i=match.group(1)) if match.groups() else target
    return None


class NameTable:
    """A format's tensor names -> ours, from ``{their pattern: our pattern}`` (``{i}``: block index)."""

    def __init__(self, table: Dict[str, str]):
        self.table = table
        self._patterns = [(_block_pattern(theirs), ours) for theirs, ours in table.items()]
        self._inverse = [(_block_pattern(ours), theirs) for theirs, ours in table.items()]

    def ours(self, name: str) -> Optional[str]:
        return _translate(self._patterns, name)

    def theirs(self, our_name: str) -> Optional[str]:
        """Our name -> the format's (for writers of the format, e.g. the benchmark's files)."""
        return _translate(self._inverse, our_name)

    def rename(self, names) -> Dict[str, str]:
        """Their name -> our name; names the table does not know keep their own."""
        return {name: self.ours(name) or name for name in names}

    def knows_any(self, names) -> bool:
        return any(self.ours(name) is not None for name in names)


class TensorFile:
    """Names, shapes, dtypes and lazily read tensors of one ``.safetensors`` file (memory-mapped by
    ``loading.SafetensorsFile``) or torch-saved state dict (``.pth``/``.pt``/``.bin``/``.ckpt``,
    loaded with ``mmap=True, weights_only=True``): no tensor is copied until it is used."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            file = SafetensorsFile(path)
            self.metadata = file.metadata
            self.shapes = {name: file.shape(name) for name in file.keys()}
            self.dtypes = {name: file.entries[name][0] for name in file.keys()}
            self.tensor = file.tensor
        else:
            state = _load_bin(path)
            self.metadata = {}
            self.shapes = {name: tuple(t.shape) for name, t in state.items()}
            self.dtypes = {name: t.dtype for name, t in state.items()}
            self.tensor = state.__getitem__


def tensor_sources(file: TensorFile, renamed: Dict[str, str], scales: Optional[Dict[str, str]] = None):
    """Sources for float tensors under our names: fp8 tensors stay fp8 (``Float8Weight``, with the
    per-tensor scale named in ``scales`` if any); other dtypes are returned as stored (and scaled
    at load when the file gives them a scale)."""
    scales = scales or {}
    sources, shapes, packed = {}, {}, set()
    for theirs, ours in renamed.items():
        if ours in sources:
            raise CheckpointError(f"{file.path}: tensors {theirs!r} and another one both map to {ours!r}")
        shapes[ours] = file.shapes[theirs]
        scale = scales.get(theirs)
        if file.dtypes[theirs] in FLOAT8_DTYPES:
            sources[ours] = (lambda t=theirs, s=scale: Float8Weight(
                file.tensor(t), None if s is None else weight_scale(file, s)))
            packed.add(ours)
        elif scale is not None:
            sources[ours] = lambda t=theirs, s=scale: file.tensor(t).float() * weight_scale(file, s).float()
        else:
            sources[ours] = lambda t=theirs: file.tensor(t)
    return sources, shapes, packed


def weight_scale(file: TensorFile, name: str) -> torch.Tensor:
    """A per-tensor weight scale (0-d): a finite positive float, else the file is corrupt."""
    scale = file.tensor(name).reshape(())
    if not scale.is_floating_point() or not bool(torch.isfinite(scale)) or not float(scale) > 0:
        raise CheckpointError(f"weight scale {name!r} is {scale.item()!r} ({scale.dtype}); "
                              "expected a finite positive float")
    return scale


def compute_dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    """The ``torch_dtype`` a file implies (what ``dtype="auto"`` loads): the stored dtype of the final
    layer norm, ComfyUI's rule for T5 text encoders (``t5_xxl_detect``: ``dtype_t5``)."""
    names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    return names.get(dtype)


def infer_config(path, shapes: Dict[str, tuple], known: Optional[dict] = None,
                 torch_dtype: Optional[str] = None) -> UMT5Config:
    """A UMT5 encoder config from ``known`` fields (file metadata) completed from tensor shapes
    (our names): vocab and d_model from the embedding, num_layers by counting blocks, num_heads and
    buckets from the bias table ``[buckets, heads]``, d_kv = q rows / heads, d_ff from ``wi_0``.
    Fields no file carries keep UMT5's defaults: layer_norm_epsilon 1e-6, max_distance 128,
    gated-gelu FFN, pad 0 / eos 1."""
    fields = dict(known or {})
    reasons = {}

    def take(field, value):
        fields.setdefault(field, value)

    embedding = shapes.get(EMBEDDING)
    if embedding is not None and len(embedding) == 2:
        take("vocab_size", embedding[0])
        take("d_model", embedding[1])
    reasons["vocab_size"] = reasons["d_model"] = f"no token embedding ({EMBEDDING})"
    block_pattern = re.compile(re.escape(BLOCK).replace(r"\{i\}", r"(\d+)"))
    blocks = {int(m.group(1)) for key in shapes if (m := block_pattern.match(key))}
    if blocks:
        take("num_layers", max(blocks) + 1)
    reasons["num_layers"] = "no encoder blocks (encoder.block.{i}.*)"
    biased = sorted(i for i in blocks if RELATIVE_BIAS.format(i=i) in shapes)
    if biased == [0] and len(blocks) > 1:
        raise CheckpointError(
            f"{path} is a T5 (v1.1) encoder, not UMT5: only block 0 has a relative_attention_bias table "
            "(UMT5 has one per layer, e.g. umt5-xxl); umt5_fast runs UMT5 models only")
    bias = shapes.get(RELATIVE_BIAS.format(i=0))
    if bias is not None and len(bias) == 2:
        take("relative_attention_num_buckets", bias[0])
        take("num_heads", bias[1])
    reasons["num_heads"] = reasons["relative_attention_num_buckets"] = \
        f"no relative attention bias table in block 0 ({RELATIVE_BIAS.format(i=0)})"
    q = shapes.get(Q.format(i=0))
    if q is not None and fields.get("num_heads"):
        if q[0] % fields["num_heads"]:
            raise CheckpointError(f"{path}: {Q.format(i=0)} has {q[0]} rows, not a multiple of "
                                  f"num_heads={fields['num_heads']}: cannot infer d_kv")
        take("d_kv", q[0] // fields["num_heads"])
    reasons["d_kv"] = f"no query projection in block 0 ({Q.format(i=0)}) or no num_heads"
    ffn_in = shapes.get(WI_0.format(i=0)) or shapes.get(WI_1.format(i=0))
    if ffn_in is not None:
        take("d_ff", ffn_in[0])
    reasons["d_ff"] = f"no gated FFN input projection in block 0 ({WI_0.format(i=0)})"
    missing = [field for field in reasons if field not in fields]
    if missing:
        detail = "; ".join(f"{field}: {reasons[field]}" for field in missing)
        raise CheckpointError(f"cannot infer the model config of {path} (and there is no config.json next to "
                              f"it): {detail}")
    fields.setdefault("layer_norm_epsilon", 1e-6)
    return UMT5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, torch_dtype=torch_dtype,
                      **fields)
