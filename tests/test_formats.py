"""Single-file text-encoder formats (``umt5_fast.formats``, docs/formats.md).

Each file is written here from a random transformers ``UMT5EncoderModel`` by a converter that follows
the format's own documentation (not our tables), loaded back with ``from_pretrained(file)``, and
compared with transformers running the file's own (dequantised) weights: fp32 math within 1e-5.
"""
import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import umt5_fast
from umt5_fast import formats
from umt5_fast.loading import CheckpointError, build_model
from umt5_fast.model import PackedEmbedding
from umt5_fast.quant import Float8Weight, Q8_0Weight
from helpers import assert_close, hf_config, make_hf_model, random_batch, rel_err

TOL = 1e-5
# UMT5's bucket distance is in no file format (every format means 128), so the test models use it.
FILE_CONFIG = dict(relative_attention_max_distance=128)
# GGML blocks run along rows: K-quants need rows of 256 values, Q8_0 of 32.
GGUF_CONFIG = dict(FILE_CONFIG, vocab_size=300, d_model=256, d_kv=32, num_heads=8, d_ff=512,
                   layer_norm_epsilon=1e-5)  # not UMT5's default: the GGUF metadata must carry it
LINEAR = re.compile(r"\.(q|k|v|o|wi_0|wi_1|wo)\.weight$")


@pytest.fixture(scope="module")
def hf_encoder():
    return make_hf_model("UMT5EncoderModel", **FILE_CONFIG)


@pytest.fixture(scope="module")
def hf_gguf_encoder():
    return make_hf_model("UMT5EncoderModel", **GGUF_CONFIG)


def encoder_state(hf):
    """transformers' state dict without the tied ``encoder.embed_tokens`` copy."""
    return {k: v.detach().contiguous() for k, v in hf.state_dict().items() if k != "encoder.embed_tokens.weight"}


def transformers_with(weights, **config):
    """A transformers UMT5EncoderModel running ``weights`` (our names, any float dtype) in fp32."""
    import transformers
    model = transformers.UMT5EncoderModel(hf_config(**config)).eval()
    params = dict(model.named_parameters())
    assert set(params) == set(weights), set(params) ^ set(weights)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].float())
    return model


def assert_matches(ours, reference, seed=0):
    ids, mask = random_batch(ours.config.vocab_size, 3, 17, seed)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close(ours(ids, attention_mask=mask).last_hidden_state, expected, TOL, "last_hidden_state")


def linears(model):
    return {name: m for name, m in model.named_modules() if type(m).__name__ == "Linear"}


# ---------------------------------------------------------------------------------------------
# ComfyUI text-encoder safetensors: transformers' names (comfy/text_encoders/t5.py), a `spiece_model`
# uint8 tensor holding the tokenizer (comfy/sd.py, CLIPType.WAN), fp8 with per-tensor scales
# (comfy/ops.py scaled_fp8_ops; comfy/utils.py convert_old_quants).
# ---------------------------------------------------------------------------------------------
def comfy_file(hf, path, dtype=torch.float32, fp8=None):
    """``fp8``: None, "plain" (float8_e4m3fn weights), "scaled" (legacy: ``scaled_fp8`` marker +
    ``<layer>.scale_weight``) or "comfy_quant" (``<layer>.weight_scale`` + ``<layer>.comfy_quant``).
    Returns the file's weights dequantised to fp32, under transformers' names."""
    state = {k: v.to(dtype) for k, v in encoder_state(hf).items()}
    weights = dict(state)
    if fp8 is not None:
        for name in [n for n in state if LINEAR.search(n)]:
            w = state[name].float()
            layer = name[: -len(".weight")]
            scale = (w.abs().max() / 448.0).reshape(()) if fp8 != "plain" else torch.tensor(1.0)
            state[name] = (w / scale).to(torch.float8_e4m3fn)
            weights[name] = state[name].float() * scale
            if fp8 == "scaled":
                state[f"{layer}.scale_weight"] = scale
                state[f"{layer}.scale_input"] = torch.tensor(1.0)  # activation scale: not part of the weight
            elif fp8 == "comfy_quant":
                state[f"{layer}.weight_scale"] = scale
                state[f"{layer}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        if fp8 == "scaled":
            state["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    state["spiece_model"] = torch.tensor(list(b"\x0a\x03abc"), dtype=torch.uint8)
    save_file(state, str(path))
    return weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_comfy_float_files_match_transformers(hf_encoder, tmp_path, dtype):
    path = tmp_path / "umt5_xxl.safetensors"
    weights = comfy_file(hf_encoder, path, dtype=dtype)
    assert formats.detect(path) == "comfy"
    ours = umt5_fast.UMT5EncoderModel.from_pretrained(path, dtype=torch.float32)
    assert_matches(ours, transformers_with(weights, **FILE_CONFIG))
    auto = umt5_fast.UMT5EncoderModel.from_pretrained(path, dtype="auto")
    assert auto.dtype == dtype  # "auto": the stored dtype of the final layer norm, ComfyUI's rule
    if dtype == torch.float16:  # ComfyUI's umt5_xxl_fp16 as an fp16 model: transformers' fp16 rules
        import transformers
        reference = transformers_with(weights, **FILE_CONFIG)
        reference.save_pretrained(tmp_path / "hf")
        reference16 = transformers.UMT5EncoderModel.from_pretrained(tmp_path / "hf", dtype=torch.float16).eval()
        assert auto.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
        ids, mask = random_batch(auto.config.vocab_size, 3, 17, 0)
        with torch.no_grad():
            exact = reference(input_ids=ids, attention_mask=mask).last_hidden_state
            theirs = reference16(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        got = auto(ids, attention_mask=mask).last_hidden_state.float()
        def rms_error(x):
            return float((x - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt())
        assert rms_error(got) <= max(1.25 * rms_error(theirs), 1e-3)  # as close to fp32 as transformers' fp16


@pytest.mark.parametrize("fp8", ["plain", "scaled", "comfy_quant"])
def test_comfy_fp8_files_stay_fp8_and_match_transformers(hf_encoder, tmp_path, fp8):
    path = tmp_path / f"umt5_xxl_fp8_e4m3fn_{fp8}.safetensors"
    weights = comfy_file(hf_encoder, path, fp8=fp8)
    ours = umt5_fast.UMT5EncoderModel.from_pretrained(path, dtype=torch.float32)
    for name, module in linears(ours).items():
        packed = module.packed_weight()
        assert isinstance(packed, Float8Weight) and packed.dtype == torch.float8_e4m3fn, name
        assert (packed.scale is None) == (fp8 == "plain"), name
    assert_matches(ours, transformers_with(weights, **FILE_CONFIG))


def test_bf16_compute_on_fp8_weights_tracks_fp32(hf_encoder, tmp_path):
    path = tmp_path / "fp8.safetensors"
    weights = comfy_file(hf_encoder, path, dtype=torch.bfloat16, fp8="scaled")
    ours = umt5_fast.UMT5EncoderModel.from_pretrained(path, dtype=torch.bfloat16)
    ids, mask = random_batch(ours.config.vocab_size, 2, 11, 3)
    with torch.no_grad():
        expected = transformers_with(weights, **FILE_CONFIG)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close(ours(ids, attention_mask=mask).last_hidden_state.float(), expected, 3e-2, "bf16 output")


# ---------------------------------------------------------------------------------------------
# GGUF, llama.cpp "t5encoder": names from gguf-py tensor_mapping.py, metadata as
# convert_hf_to_gguf.py's T5EncoderModel.set_gguf_parameters writes it; 1-D tensors stay F32 and
# the bias tables F16 as llama.cpp leaves them. gguf-py can quantise Q8_0 but not the K-quants, so
# K-quant blocks are random codes with sane fp16 super-block scales at their documented offsets
# (ggml-common.h block_q4_K / block_q5_K: d, dmin first; block_q6_K: d last): the loader's job is
# to dequantise what the file holds, whatever it approximates.
# ---------------------------------------------------------------------------------------------
GGUF_NAMES = [  # (transformers, llama.cpp)
    (r"^shared\.weight$", "token_embd.weight"),
    (r"^encoder\.final_layer_norm\.weight$", "enc.output_norm.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$", r"enc.blk.\1.attn_norm.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkv])\.weight$", r"enc.blk.\1.attn_\2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.o\.weight$", r"enc.blk.\1.attn_o.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$", r"enc.blk.\1.attn_rel_b.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$", r"enc.blk.\1.ffn_norm.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight$", r"enc.blk.\1.ffn_gate.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight$", r"enc.blk.\1.ffn_up.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight$", r"enc.blk.\1.ffn_down.weight"),
]
# Scales of the random K-quant blocks (byte offset: value), so that weights stay within ~0.2 as in
# a trained model. With 1e-4, Q6_K's signed 8-bit sub-scales give weights twice as large and a
# model that amplifies fp32 rounding ~20x: any two fp32 summation orders then differ by ~1.6e-5
# (transformers' MKL on an AMD CPU against ours), and the 1e-5 match measures the order, not the
# format. The ill-conditioned model stays for the test that measures accuracy against fp64.
K_QUANT_SCALES = {"Q4_K": {0: 2e-4, 2: 2e-4}, "Q5_K": {0: 1e-4, 2: 1e-4}, "Q6_K": {208: 5e-5}}
ILL_CONDITIONED_Q6_K_SCALES = {208: 1e-4}


def gguf_name(name):
    for pattern, replacement in GGUF_NAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    raise KeyError(name)


def gguf_file(hf, path, qtype_name, architecture="t5encoder", k_quant_scales=None):
    """Write ``hf`` as a GGUF file with every 2-D weight but the bias tables in ``qtype_name``
    (K-quants: random blocks with ``k_quant_scales``, by default K_QUANT_SCALES'); returns the
    file's weights dequantised to fp32, under transformers' names."""
    import gguf
    import numpy as np
    T = gguf.GGMLQuantizationType
    qtype = T[qtype_name]
    cfg = hf.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(512)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_block_count(cfg.num_layers)
    writer.add_head_count(cfg.num_heads)
    writer.add_key_length(cfg.d_kv)
    writer.add_value_length(cfg.d_kv)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_relative_attn_buckets_count(cfg.relative_attention_num_buckets)
    writer.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(0)
    rng = np.random.default_rng(0)
    weights = {}
    for name, tensor in encoder_state(hf).items():
        array = tensor.float().numpy()
        if array.ndim == 1:
            data, tensor_type = array, T.F32
        elif "relative_attention_bias" in name:
            data, tensor_type = array.astype(np.float16), T.F16
        elif qtype_name in K_QUANT_SCALES:
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
            data = rng.integers(0, 256, (array.shape[0], array.shape[1] // block_size, type_size), dtype=np.uint8)
            for offset, value in (k_quant_scales or K_QUANT_SCALES[qtype_name]).items():
                data[..., offset:offset + 2] = np.full(data.shape[:2], value, np.float16)[..., None].view(np.uint8)
            data, tensor_type = data.reshape(array.shape[0], -1), qtype
        else:
            data, tensor_type = gguf.quants.quantize(array, qtype), qtype
        writer.add_tensor(gguf_name(name), data, raw_dtype=tensor_type)
        weights[name] = torch.from_numpy(gguf.quants.dequantize(data, tensor_type).reshape(array.shape).copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q4_K"])
def test_gguf_files_match_transformers(hf_gguf_encoder, tmp_path, qtype):
    path = tmp_path / f"umt5-xxl-encoder-{qtype}.gguf"
    weights = gguf_file(hf_gguf_encoder, path, qtype)
    assert formats.detect(path) == "gguf"
    ours = umt5_fast.UMT5EncoderModel.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    # from t5encoder.attention.layer_norm_epsilon, a float32: read back as the config's 1e-05
    assert ours.config.layer_norm_epsilon == 1e-5
    kinds = {type(m.packed_weight()) for m in linears(ours).values()}
    assert kinds == ({Q8_0Weight} if qtype == "Q8_0" else {torch.nn.Parameter})  # K-quants: dequantised at load
    # A Q8_0 token embedding stays Q8_0 too (rows expanded per lookup), in the encoder as in `shared`.
    assert isinstance(ours.shared, PackedEmbedding) == (qtype == "Q8_0")
    assert ours.encoder.embed_tokens is ours.shared
    assert_matches(ours, transformers_with(weights, **GGUF_CONFIG))


def test_long_inputs_of_an_ill_conditioned_model_are_as_accurate_as_transformers(hf_gguf_encoder, tmp_path):
    """351 rows: fp32 GEMMs of that size take oneDNN on AMD AVX-512 CPUs (ops.cpu.WIDE_GEMMS_IN_ONEDNN),
    which sums in another order than MKL. On this Q6_K model every fp32 implementation lands
    ~2.5e-5 from the fp64 result (transformers' own fp32 included), so 1e-5 against transformers
    would measure summation order; the bar is fp32 accuracy: within 1.5x transformers' fp32 error."""
    path = tmp_path / "umt5-xxl-encoder-Q6_K.gguf"
    weights = gguf_file(hf_gguf_encoder, path, "Q6_K", k_quant_scales=ILL_CONDITIONED_Q6_K_SCALES)
    ours = umt5_fast.UMT5EncoderModel.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    reference = transformers_with(weights, **GGUF_CONFIG)
    ids, mask = random_batch(ours.config.vocab_size, 3, 117, seed=0)
    with torch.no_grad():
        fp32 = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        exact = reference.double()(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask).last_hidden_state
    assert rel_err(got, exact) <= 1.5 * rel_err(fp32, exact)


def test_q8_0_embedding_rows_and_save_pretrained(hf_gguf_encoder, tmp_path):
    path = tmp_path / "umt5-xxl-encoder-Q8_0.gguf"
    weights = gguf_file(hf_gguf_encoder, path, "Q8_0")
    ours = umt5_fast.UMT5EncoderModel.from_pretrained(path, dtype=torch.bfloat16)
    assert ours.shared.qweight.dtype == torch.int8
    ids = torch.randint(0, ours.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(5))
    looked_up = ours.get_input_embeddings()(ids)
    assert looked_up.dtype == torch.bfloat16 and looked_up.shape == (3, 11, ours.config.d_model)
    assert torch.equal(looked_up, weights["shared.weight"].to(torch.bfloat16)[ids])
    with pytest.raises(ValueError, match="input_ids"):
        ours(input_ids=torch.tensor([[ours.config.vocab_size]]))
    ours.save_pretrained(tmp_path / "saved")
    reloaded = umt5_fast.UMT5EncoderModel.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    assert torch.equal(reloaded.shared.weight, weights["shared.weight"].to(torch.bfloat16))


def test_gguf_of_another_architecture_is_refused(hf_gguf_encoder, tmp_path):
    path = tmp_path / "t5.gguf"
    gguf_file(hf_gguf_encoder, path, "F16", architecture="t5")
    with pytest.raises(CheckpointError, match="architecture 't5'.*t5encoder"):
        umt5_fast.UMT5EncoderModel.from_pretrained(path)


# ---------------------------------------------------------------------------------------------
# Wan's models_t5_umt5-xxl-enc-bf16.pth: T5Encoder's state dict (Wan2.1 wan/modules/t5.py).
# ---------------------------------------------------------------------------------------------
WAN_NAMES = [  # (transformers, Wan)
    (r"^shared\.weight$", "token_embedding.weight"),
    (r"^encoder\.final_layer_norm\.weight$", "norm.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$", r"blocks.\1.norm1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight$", r"blocks.\1.attn.\2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$",
     r"blocks.\1.pos_embedding.embedding.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$", r"blocks.\1.norm2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight$", r"blocks.\1.ffn.gate.0.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight$", r"blocks.\1.ffn.fc1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight$", r"blocks.\1.ffn.fc2.weight"),
]


def wan_state(hf, dtype=torch.bfloat16):
    state = {}
    for name, tensor in encoder_state(hf).items():
        pattern, replacement = next((p, r) for p, r in WAN_NAMES if re.match(p, name))
        state[re.sub(pattern, replacement, name)] = tensor.to(dtype)
    return state


def test_wan_pth_matches_transformers(hf_encoder, tmp_path):
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    state = wan_state(hf_encoder)
    torch.save(state, path)
    assert formats.detect(path) == "wan"
    ours = umt5_fast.UMT5EncoderModel.from_pretrained(path, dtype=torch.float32)
    weights = {name: hf_tensor.to(torch.bfloat16) for name, hf_tensor in encoder_state(hf_encoder).items()}
    assert_matches(ours, transformers_with(weights, **FILE_CONFIG))
    assert umt5_fast.UMT5EncoderModel.from_pretrained(path, dtype="auto").dtype == torch.bfloat16


def test_wan_file_with_unknown_tensors_lists_them(hf_encoder, tmp_path):
    state = wan_state(hf_encoder)
    state["blocks.0.ffn.extra.weight"] = torch.zeros(3)
    del state["blocks.1.attn.v.weight"]
    torch.save(state, tmp_path / "wan.pth")
    with pytest.raises(CheckpointError) as info:
        umt5_fast.UMT5EncoderModel.from_pretrained(tmp_path / "wan.pth")
    message = str(info.value)
    assert "blocks.0.ffn.extra.weight" in message and "unexpected" in message
    assert "encoder.block.1.layer.0.SelfAttention.v.weight" in message and "missing" in message


# ---------------------------------------------------------------------------------------------
# Config, checks and lazy reading shared by every format
# ---------------------------------------------------------------------------------------------
def test_inferred_config_and_config_json_next_to_the_file(tmp_path):
    hf = make_hf_model("UMT5EncoderModel")  # relative_attention_max_distance=40: in no file format
    path = tmp_path / "te.safetensors"
    weights = comfy_file(hf, path)
    inferred = formats.read(path).config
    expected = dict(vocab_size=131, d_model=40, d_kv=24, d_ff=72, num_layers=2, num_heads=5,
                    relative_attention_num_buckets=20, relative_attention_max_distance=128)
    assert {k: getattr(inferred, k) for k in expected} == expected
    hf.config.save_pretrained(tmp_path)  # config.json next to the file wins
    ours = umt5_fast.UMT5EncoderModel.from_pretrained(path)
    assert ours.config.relative_attention_max_distance == 40
    assert_matches(ours, transformers_with(weights))


@pytest.mark.parametrize("damage, message", [
    ("missing", r"missing tensors.*encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight"),
    ("misshaped", r"encoder\.block\.0\.layer\.0\.SelfAttention\.k\.weight.*shape \(3, 40\)"),
    ("t5", r"T5 \(v1\.1\) encoder, not UMT5"),
    ("no-bias", r"cannot infer.*num_heads.*relative attention bias"),
    ("nvfp4", r"not supported.*nvfp4"),
    ("row-scale", r"scale_weight.*per-tensor"),
    ("nan-scale", r"weight scale 'encoder\.block\.0\.layer\.0\.SelfAttention\.q\.scale_weight' is nan"),
    ("zero-scale", r"weight scale .* is 0\.0 .*finite positive"),
    ("quant-list", r"quantisation entries of \['encoder\.block\.0\.layer\.0\.SelfAttention\.q'\] are not JSON objects"),
    ("quant-string", r"quantisation entries of .* are not JSON objects"),
])
def test_bad_files_raise_errors_naming_the_problem(hf_encoder, tmp_path, damage, message):
    state = encoder_state(hf_encoder)
    metadata = None
    if damage == "missing":
        del state["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    elif damage == "misshaped":
        state["encoder.block.0.layer.0.SelfAttention.k.weight"] = torch.zeros(3, 40)
    elif damage in ("t5", "no-bias"):
        for i in range(1 if damage == "t5" else 0, 2):
            del state[f"encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"]
    elif damage == "nvfp4":
        metadata = {"_quantization_metadata": json.dumps({"layers": {"encoder.block.0.layer.0.SelfAttention.q":
                                                                     {"format": "nvfp4"}}})}
    elif damage == "row-scale":
        state["encoder.block.0.layer.0.SelfAttention.q.scale_weight"] = torch.ones(120)
    elif damage in ("nan-scale", "zero-scale"):
        state["encoder.block.0.layer.0.SelfAttention.q.scale_weight"] = torch.tensor(
            float("nan") if damage == "nan-scale" else 0.0)
    elif damage == "quant-list":
        state["encoder.block.0.layer.0.SelfAttention.q.comfy_quant"] = torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)
    elif damage == "quant-string":
        metadata = {"_quantization_metadata": json.dumps({"layers": {"encoder.block.0.layer.0.SelfAttention.q":
                                                                     "float8_e4m3fn"}})}
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=message):
        umt5_fast.UMT5EncoderModel.from_pretrained(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("length", [4, 40, 200])
def test_truncated_gguf_files_are_refused(hf_gguf_encoder, tmp_path, length):
    gguf_file(hf_gguf_encoder, tmp_path / "full.gguf", "F16")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "full.gguf").read_bytes()[:length])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        umt5_fast.UMT5EncoderModel.from_pretrained(tmp_path / "cut.gguf")


def test_unknown_files_are_refused(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"PK")
    with pytest.raises(CheckpointError, match="unknown checkpoint file type '.npz'"):
        formats.detect(tmp_path / "weights.npz")
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, str(tmp_path / "llama.safetensors"))
    with pytest.raises(CheckpointError, match="no tensor has a name of a known UMT5"):
        formats.detect(tmp_path / "llama.safetensors")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 12)
    with pytest.raises(CheckpointError, match="broken.gguf"):
        umt5_fast.UMT5EncoderModel.from_pretrained(tmp_path / "broken.gguf")


def test_encoder_model_reads_only_encoder_tensors_of_a_seq2seq_file(tmp_path):
    hf = make_hf_model("UMT5ForConditionalGeneration", **FILE_CONFIG)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()
             if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}
    save_file(state, str(tmp_path / "umt5.safetensors"))
    checkpoint = formats.read(tmp_path / "umt5.safetensors")
    read = []
    sources = {k: (lambda k=k, f=f: (read.append(k), f())[1]) for k, f in checkpoint.sources.items()}
    ours = build_model(umt5_fast.UMT5EncoderModel, checkpoint.config, sources, checkpoint.shapes, backend="eager",
                       packed=checkpoint.packed)
    assert read and not [k for k in read if not k.startswith(("shared.", "encoder."))]
    assert_matches(ours, hf.encoder)


# ---------------------------------------------------------------------------------------------
# Memory: a base-sized encoder (d_model 768, 12 layers, d_ff 2048, vocab 32128) loaded from one
# file costs at most 1.15x the bytes the model keeps, in peak RSS of a fresh process, with every
# weight touched (one forward pass plus a read of every stored byte).
# ---------------------------------------------------------------------------------------------
BASE_SHAPE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12)
TINY_SHAPE = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)

MEMORY_PROBE = textwrap.dedent("""
    import sys, torch
    import umt5_fast

    def peak_bytes():  # VmHWM: this process's own peak RSS (ru_maxrss can carry the parent's)
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    def load_and_touch(path):
        model = umt5_fast.UMT5EncoderModel.from_pretrained(path, dtype=torch.bfloat16)
        model(torch.arange(2, 18)[None])
        stored = list(model.parameters()) + list(model.buffers())
        for t in stored:
            t.reshape(-1).view(torch.uint8).max()  # read every stored byte (a reduction, no copy)
        return sum(t.numel() * t.element_size() for t in stored)

    load_and_touch(sys.argv[2])  # warm-up on a tiny file: imports and first-call allocations
    before = peak_bytes()
    kept = load_and_touch(sys.argv[1])
    print(peak_bytes() - before, kept)
""")


def write_random_comfy_file(path, shape, fp8):
    """Random bf16 weights under ComfyUI's (transformers') names; linear weights scaled fp8 if ``fp8``.
    Values repeat a random pool: only the bytes' count matters here, and tiling is fast."""
    config = umt5_fast.UMT5Config(**shape, **FILE_CONFIG)
    with torch.device("meta"):
        skeleton = umt5_fast.UMT5EncoderModel(config, backend="eager")
    pool = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)) * 0.05
    pools = {torch.bfloat16: pool.to(torch.bfloat16), torch.float8_e4m3fn: (pool * 8000).to(torch.float8_e4m3fn)}
    state = {}
    for name, p in skeleton.named_parameters():
        dtype = torch.float8_e4m3fn if fp8 and LINEAR.search(name) else torch.bfloat16
        state[name] = pools[dtype].repeat(p.numel() // pool.numel() + 1)[: p.numel()].view(p.shape)
        if dtype == torch.float8_e4m3fn:
            state[name[: -len("weight")] + "scale_weight"] = torch.tensor(1 / 8000)
    save_file(state, str(path))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "scaled-fp8"])
def test_single_file_loading_peaks_below_1_15x_the_kept_tensors(tmp_path, fp8):
    big, tiny = tmp_path / "base.safetensors", tmp_path / "tiny.safetensors"
    write_random_comfy_file(big, BASE_SHAPE, fp8)
    write_random_comfy_file(tiny, TINY_SHAPE, fp8)
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(big), str(tiny)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    growth, kept = (int(v) for v in result.stdout.split()[-2:])
    print(f"peak RSS growth {growth / 2**20:.0f} MiB for {kept / 2**20:.0f} MiB kept: {growth / kept:.2f}x")
    assert growth <= 1.15 * kept


# ---------------------------------------------------------------------------------------------
# diffusers: our UMT5EncoderModel as WanPipeline's text encoder (the tiny pipeline of diffusers'
# tests/pipelines/wan/test_wan.py, with a UMT5 text encoder and a sentencepiece tokenizer trained here).
# ---------------------------------------------------------------------------------------------
def tiny_tokenizer(directory):
    import sentencepiece
    from transformers import T5TokenizerFast
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(["a video of a cat dancing in the rain", "dance monkey", "negative, blurry",
                                 "the quick brown fox jumps over the lazy dog"] * 25))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(directory / "spiece"),
                                             vocab_size=60, hard_vocab_limit=False, model_type="unigram",
                                             pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return T5TokenizerFast(vocab_file=str(directory / "spiece.model"), extra_ids=0)


def test_wan_pipeline_encode_prompt_with_our_text_encoder(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    try:
        from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    except ImportError as exc:
        pytest.skip(f"diffusers {diffusers.__version__} has no usable WanPipeline ({exc})")
    pytest.importorskip("ftfy", reason="WanPipeline's prompt cleaning needs ftfy")
    tokenizer = tiny_tokenizer(tmp_path)
    config = dict(FILE_CONFIG, vocab_size=len(tokenizer), d_model=32, d_kv=8, num_heads=4, d_ff=64)
    hf = make_hf_model("UMT5EncoderModel", **config)
    torch.manual_seed(0)
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=hf, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        vae=AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                             temperal_downsample=[False, True, True]),
        transformer=WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                          in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                          num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                          rope_max_seq_len=32))
    prompts = dict(prompt=["a cat dancing", "the lazy dog"], negative_prompt="blurry", max_sequence_length=16,
                   device="cpu")
    with torch.no_grad():
        expected = pipe.encode_prompt(**prompts)

    path = tmp_path / "umt5_xxl_fp32.safetensors"  # the ComfyUI file of the same text encoder
    comfy_file(hf, path)
    pipe.text_encoder = umt5_fast.UMT5EncoderModel.from_pretrained(path, dtype=torch.float32)
    got = pipe.encode_prompt(**prompts)
    for ours, reference, what in zip(got, expected, ("prompt_embeds", "negative_prompt_embeds")):
        assert ours.dtype == reference.dtype
        assert_close(ours, reference, TOL, what)
