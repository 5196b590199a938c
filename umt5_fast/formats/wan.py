"""Wan's own text-encoder checkpoint, ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan 2.1 / 2.2 releases).

Layout, checked against Wan-Video/Wan2.1 ``wan/modules/t5.py``: ``T5EncoderModel`` builds
``umt5_xxl(encoder_only=True)`` -- a ``T5Encoder`` with ``shared_pos=False`` (one
``T5RelativeEmbedding`` per block, ``max_dist=128``, 32 buckets) -- and loads the file with
``model.load_state_dict(torch.load(path))``, so the file's keys are ``T5Encoder``'s state dict:
``token_embedding``, ``blocks[i].{norm1, attn.{q,k,v,o}, norm2, ffn.{gate[0], fc1, fc2},
pos_embedding.embedding}``, ``norm``. ``T5FeedForward`` computes ``fc2(fc1(x) * GELU(gate(x)))``
(tanh GELU): ``gate.0`` is transformers' ``wi_0`` (the activated one), ``fc1`` is ``wi_1``,
``fc2`` is ``wo``. The same names also appear in safetensors conversions of that file; fp8
tensors there stay fp8 like ComfyUI's.
"""
from umt5_fast.formats import common

NAME = "wan"

TENSOR_NAMES = common.NameTable({
    "token_embedding.weight": common.EMBEDDING,
    "blocks.{i}.norm1.weight": common.ATTENTION_NORM,
    "blocks.{i}.attn.q.weight": common.Q,
    "blocks.{i}.attn.k.weight": common.K,
    "blocks.{i}.attn.v.weight": common.V,
    "blocks.{i}.attn.o.weight": common.O,
    "blocks.{i}.pos_embedding.embedding.weight": common.RELATIVE_BIAS,
    "blocks.{i}.norm2.weight": common.FFN_NORM,
    "blocks.{i}.ffn.gate.0.weight": common.WI_0,
    "blocks.{i}.ffn.fc1.weight": common.WI_1,
    "blocks.{i}.ffn.fc2.weight": common.WO,
    "norm.weight": common.FINAL_NORM,
})


def claims(names) -> bool:
    return TENSOR_NAMES.knows_any(names)


def read(path, file: common.TensorFile, config=None) -> common.FormatCheckpoint:
    renamed = TENSOR_NAMES.rename(file.shapes)
    sources, shapes, packed = common.tensor_sources(file, renamed)
    if config is None:
        config = common.infer_config(path, shapes,
                                     torch_dtype=common.compute_dtype_name(file.dtypes.get("norm.weight")))
    return common.FormatCheckpoint(config, sources, shapes, packed)
