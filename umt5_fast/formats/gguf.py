"""GGUF text encoders of llama.cpp's ``t5encoder`` architecture (city96's umt5-xxl-encoder GGUFs for
ComfyUI-GGUF: F16, BF16, Q8_0, Q6_K, Q5_K, Q4_K, ...).

Layout, checked against ggml-org/llama.cpp: ``gguf-py/gguf/constants.py`` (``MODEL_ARCH.T5ENCODER``
= "t5encoder" and its tensor names ``token_embd``, ``enc.blk.{bid}.attn_norm / attn_q / attn_k /
attn_v / attn_o / attn_rel_b / ffn_norm / ffn_gate / ffn_up / ffn_down``, ``enc.output_norm``),
``gguf-py/gguf/tensor_mapping.py`` (the transformers name behind each, e.g. ``ffn_gate`` =
``DenseReluDense.wi_0``, ``ffn_up`` = ``wi_1``) and ``convert_hf_to_gguf.py`` (``T5EncoderModel``:
``t5encoder.context_length / embedding_length / feed_forward_length / block_count /
attention.head_count / attention.key_length / attention.layer_norm_epsilon /
attention.relative_buckets_count``); city96/ComfyUI-GGUF ``loader.py`` (``T5_SD_MAP``) maps the
same names back for ComfyUI. GGUF stores dimensions innermost first; the reader's arrays are in
torch order.

Storage: F32 / F16 / BF16 tensors are memory-mapped views of the file; Q8_0 linear weights stay
Q8_0 in memory (``umt5_fast.quant.Q8_0Weight``, zero-copy views of the blocks) and are expanded one
layer at a time; every other quantisation type (the K-quants Q6_K / Q5_K / Q4_K, ...) is
dequantised once at load by ``gguf.quants.dequantize`` to the requested dtype, a bounded number of
rows at a time. Quantised tensors that are not linear weights (e.g. a Q8_0 ``token_embd``) are
dequantised at load too.
"""
import numpy as np
import torch
import gguf

from umt5_fast.formats import common
from umt5_fast.loading import CheckpointError
from umt5_fast.quant import Q8_0Weight, expand_in_row_blocks

NAME = "gguf"
ARCHITECTURE = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.T5ENCODER]  # "t5encoder"

TENSOR_NAMES = common.NameTable({
    "token_embd.weight": common.EMBEDDING,
    "enc.blk.{i}.attn_norm.weight": common.ATTENTION_NORM,
    "enc.blk.{i}.attn_q.weight": common.Q,
    "enc.blk.{i}.attn_k.weight": common.K,
    "enc.blk.{i}.attn_v.weight": common.V,
    "enc.blk.{i}.attn_o.weight": common.O,
    "enc.blk.{i}.attn_rel_b.weight": common.RELATIVE_BIAS,
    "enc.blk.{i}.ffn_norm.weight": common.FFN_NORM,
    "enc.blk.{i}.ffn_gate.weight": common.WI_0,
    "enc.blk.{i}.ffn_up.weight": common.WI_1,
    "enc.blk.{i}.ffn_down.weight": common.WO,
    "enc.output_norm.weight": common.FINAL_NORM,
    "output.weight": "lm_head.weight",
})

# GGUF metadata key -> UMT5Config field (keys as convert_hf_to_gguf.py's T5EncoderModel writes them).
CONFIG_KEYS = {
    gguf.Keys.LLM.VOCAB_SIZE: "vocab_size",
    gguf.Keys.LLM.EMBEDDING_LENGTH: "d_model",
    gguf.Keys.LLM.FEED_FORWARD_LENGTH: "d_ff",
    gguf.Keys.LLM.BLOCK_COUNT: "num_layers",
    gguf.Keys.Attention.HEAD_COUNT: "num_heads",
    gguf.Keys.Attention.KEY_LENGTH: "d_kv",
    gguf.Keys.Attention.LAYERNORM_RMS_EPS: "layer_norm_epsilon",
    gguf.Keys.Attention.LAYERNORM_EPS: "layer_norm_epsilon",
    gguf.Keys.Attention.REL_BUCKETS_COUNT: "relative_attention_num_buckets",
}
TOKEN_ID_KEYS = {gguf.Keys.Tokenizer.EOS_ID: "eos_token_id", gguf.Keys.Tokenizer.PAD_ID: "pad_token_id"}

_FLOAT_TYPES = {gguf.GGMLQuantizationType.F32: torch.float32, gguf.GGMLQuantizationType.F16: torch.float16}


def open_file(path) -> gguf.GGUFReader:
    try:  # copy-on-write map: writable (so torch.from_numpy does not warn) and the file stays untouched
        return gguf.GGUFReader(path, "c")
    except Exception as exc:  # gguf-py fails on damaged files with ValueError, IndexError, KeyError, ...
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


class GGMLQuantized:
    """A GGML-quantised tensor that is dequantised at load (not a ``PackedWeight``, so it is never
    kept packed), by ``gguf.quants.dequantize`` one block of rows at a time."""

    def __init__(self, name: str, blocks: np.ndarray, qtype, shape: tuple):
        self.name, self.blocks, self.qtype, self.shape = name, blocks, qtype, shape

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        blocks = self.blocks.reshape(-1, self.blocks.shape[-1])  # one row of blocks per output row

        def rows_fn(rows):
            try:
                return torch.from_numpy(gguf.quants.dequantize(blocks[rows], self.qtype))
            except NotImplementedError as exc:
                raise CheckpointError(f"tensor {self.name!r} is {self.qtype.name}, which the installed gguf "
                                      "package cannot dequantise") from exc

        return expand_in_row_blocks(self.shape, dtype, rows_fn)


def read(path, reader: gguf.GGUFReader, config=None) -> common.FormatCheckpoint:
    architecture = _field(reader, gguf.Keys.General.ARCHITECTURE)
    if architecture != ARCHITECTURE:
        raise CheckpointError(f"{path}: GGUF architecture {architecture!r} is not supported; umt5_fast reads "
                              f"llama.cpp {ARCHITECTURE!r} text-encoder files")
    tensors = {t.name: t for t in reader.tensors}
    renamed = TENSOR_NAMES.rename(tensors)
    sources, shapes, packed = {}, {}, set()
    for theirs, ours in renamed.items():
        tensor = tensors[theirs]
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        shapes[ours] = shape
        sources[ours], is_packed = _source(theirs, tensor, shape)
        if is_packed:
            packed.add(ours)
    if config is None:
        keys = {**{key.format(arch=ARCHITECTURE): field for key, field in CONFIG_KEYS.items()}, **TOKEN_ID_KEYS}
        known = {}
        for key, field in keys.items():
            if _field(reader, key) is not None:
                known.setdefault(field, _field(reader, key))
        norm = tensors.get("enc.output_norm.weight")
        torch_dtype = common.compute_dtype_name(_FLOAT_TYPES.get(norm.tensor_type) if norm is not None else None)
        config = common.infer_config(path, shapes, known, torch_dtype=torch_dtype)
    return common.FormatCheckpoint(config, sources, shapes, packed)


def _source(name, tensor, shape):
    """(callable, packed?) for one GGUF tensor."""
    qtype = tensor.tensor_type
    data = tensor.data  # a view of the memory map, in torch dimension order
    if qtype in _FLOAT_TYPES:
        return (lambda: torch.from_numpy(data)), False
    if qtype == gguf.GGMLQuantizationType.BF16:  # raw 2-byte words
        return (lambda: torch.from_numpy(data).view(torch.bfloat16)), False
    if qtype == gguf.GGMLQuantizationType.Q8_0 and len(shape) == 2:
        return (lambda: Q8_0Weight.from_blocks(torch.from_numpy(data))), True
    return (lambda: GGMLQuantized(name, data, qtype, shape)), True


def _field(reader: gguf.GGUFReader, key: str):
    """A metadata value as a python scalar / string, or None when the file lacks the key."""
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    if field.types == [gguf.GGUFValueType.FLOAT32]:
        # the shortest decimal of the stored float32: the config's 1e-06 comes back as 1e-06, not
        # as 9.999999974752427e-07 (the same float32, so the same sums either way)
        value = float(str(np.float32(value)))
    return value
