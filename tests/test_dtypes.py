"""Reduced precision follows transformers' rules: fp32 RMSNorm variance, fp16 keeps `wo` in fp32 and
clamps infinities. Tolerances (relative to the max |reference|): against transformers in the same
dtype 2e-3 (same math, different kernels' rounding); against fp32 5e-2 for fp16 and 1e-1 for bf16
(bf16 has 8 bits of mantissa)."""
import pytest
import torch

import umt5_fast
from helpers import assert_close, random_batch

SAME_DTYPE_TOL = 2e-3
FP32_TOL = {torch.float16: 5e-2, torch.bfloat16: 1e-1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_follows_transformers(checkpoint_factory, dtype):
    import transformers
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration")
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, dtype=dtype, backend="eager")
    hf = transformers.UMT5ForConditionalGeneration.from_pretrained(path, torch_dtype=dtype).eval()
    fp32 = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="eager")
    wo = ours.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    assert wo.dtype == hf.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
    ids, mask = random_batch(ours.config.vocab_size, 3, 45, 0)
    dec, _ = random_batch(ours.config.vocab_size, 3, 9, 1, padding=(None,))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    out = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert out.dtype == ref.dtype
    assert_close(out.float(), ref.float(), SAME_DTYPE_TOL, f"{dtype} vs transformers {dtype}")
    full = fp32(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert_close(out.float(), full, FP32_TOL[dtype], f"{dtype} vs fp32")


def test_fp16_overflow_is_clamped_like_transformers(checkpoint_factory, tmp_path):
    """Scale the FFN so its activations overflow fp16 (T5's known failure): outputs stay finite."""
    import transformers
    _, hf32 = checkpoint_factory("UMT5EncoderModel")
    hf = transformers.UMT5EncoderModel(hf32.config)
    hf.load_state_dict(hf32.state_dict())
    with torch.no_grad():
        for block in hf.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(3e4)
    hf.save_pretrained(tmp_path)
    ours = umt5_fast.UMT5EncoderModel.from_pretrained(tmp_path, dtype=torch.float16, backend="eager")
    ref_model = transformers.UMT5EncoderModel.from_pretrained(tmp_path, torch_dtype=torch.float16).eval()
    ids, mask = random_batch(ours.config.vocab_size, 2, 30, 4)
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=mask).last_hidden_state
        # the overflow is real: the same FFN with an fp16 `wo` produces inf
        ff = ref_model.encoder.block[0].layer[1].DenseReluDense
        h = ff.act(ff.wi_0(ref_model.shared(ids))) * ff.wi_1(ref_model.shared(ids))
        raw = torch.nn.functional.linear(h, ff.wo.weight.half())
    assert not torch.isfinite(raw).all()
    out = ours(ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    assert_close(out.float(), ref.float(), SAME_DTYPE_TOL, "clamped fp16 encoder")


def test_auto_dtype_takes_the_checkpoint_dtype(checkpoint_factory, tmp_path):
    import transformers
    path, _ = checkpoint_factory("UMT5EncoderModel")
    transformers.UMT5EncoderModel.from_pretrained(path, torch_dtype=torch.bfloat16).save_pretrained(tmp_path)
    model = umt5_fast.UMT5EncoderModel.from_pretrained(tmp_path, dtype="auto", backend="eager")
    assert model.dtype == torch.bfloat16
    assert umt5_fast.UMT5EncoderModel.from_pretrained(tmp_path, backend="eager").dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,decoder_length", [(3, 9), (8, 1)])  # (8, 1): decode-sized linears
def test_cpu_backend_half_precision_is_as_accurate_as_transformers(checkpoint_factory, dtype, batch,
                                                                   decoder_length):
    """The cpu backend runs bf16 / fp16 attention in fp32 (one rounding of its output), so it is not
    bit-compatible with transformers' half-precision scores; held instead to the fp32 model: no
    further from it than transformers in the same dtype (RMS error within 1.25x of its), and within
    FP32_TOL (max error)."""
    import transformers
    from umt5_fast.ops import available_backends
    if "cpu" not in available_backends():
        pytest.skip("C++ extension not built")
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration")
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, dtype=dtype, backend="cpu")
    hf = transformers.UMT5ForConditionalGeneration.from_pretrained(path, torch_dtype=dtype).eval()
    fp32 = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="eager")
    ids, mask = random_batch(ours.config.vocab_size, batch, 45, 2)
    dec, _ = random_batch(ours.config.vocab_size, batch, decoder_length + 1, 3, padding=(None,))
    dec = dec[:, :decoder_length]
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.float()
    full = fp32(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    out = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert out.dtype == dtype
    def rms_error(x):  # over all logits: stabler than the max, which one element decides
        return ((x - full).pow(2).mean().sqrt() / full.pow(2).mean().sqrt()).item()
    ours_error, their_error = rms_error(out.float()), rms_error(theirs)
    print(f"{dtype} vs fp32: umt5_fast cpu {ours_error:.2e}, transformers {their_error:.2e}")
    assert ours_error <= max(1.25 * their_error, 1e-3)
    assert_close(out.float(), full, FP32_TOL[dtype], f"{dtype} vs fp32")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_decoding_is_as_accurate_as_transformers(checkpoint_factory, dtype):
    """A bf16 / fp16 model's greedy steps on the cpu backend (the C++ decode step, with its attention
    against the static cache: bf16 products where the CPU has AVX512-BF16, else the fp32 kernel on
    half-precision K/V) against the fp32 model on the generated sequences, teacher-forced: no further
    from it than transformers' forward in that dtype on the same sequences (RMS error within 1.25x of
    its), and within FP32_TOL (max error). 14 steps pass the decoder's max_distance of 10; the source is
    padded on both sides."""
    import transformers
    from umt5_fast import decode_step
    from umt5_fast.ops import available_backends
    if "cpu" not in available_backends():
        pytest.skip("C++ extension not built")
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration", relative_attention_max_distance=10,
                                 relative_attention_num_buckets=8)
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, dtype=dtype, backend="cpu")
    assert decode_step.build(ours) is not None  # with or without AVX512-BF16
    hf = transformers.UMT5ForConditionalGeneration.from_pretrained(path, torch_dtype=dtype).eval()
    fp32 = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="eager")
    ids, mask = random_batch(ours.config.vocab_size, 3, 37, 4)
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=14, eos_token_id=None, output_scores=True,
                        return_dict_in_generate=True)
    steps = torch.stack(out.scores, dim=1).float()  # greedy without processors: the raw logits
    decoder_ids = out.sequences[:, :-1]
    with torch.no_grad():
        full = fp32(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits.float()
    assert steps.shape == full.shape
    def rms_error(x):
        return ((x - full).pow(2).mean().sqrt() / full.pow(2).mean().sqrt()).item()
    ours_error, their_error = rms_error(steps), rms_error(theirs)
    print(f"{dtype} decoding vs fp32: umt5_fast cpu {ours_error:.2e}, transformers {their_error:.2e}")
    assert ours_error <= max(1.25 * their_error, 1e-3)
    assert_close(steps, full, FP32_TOL[dtype], f"{dtype} decoding vs fp32")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("class_name,field", [("UMT5ForSequenceClassification", "logits"),
                                              ("UMT5ForQuestionAnswering", "start_logits"),
                                              ("UMT5ForTokenClassification", "logits")])
def test_half_precision_task_heads_round_their_bias_as_transformers(checkpoint_factory, dtype, class_name, field):
    """The biased head layers round x @ W.T + b once (F.linear), as transformers: eager is bit-exact."""
    import transformers
    path, _ = checkpoint_factory(class_name)
    ours = getattr(umt5_fast, class_name).from_pretrained(path, dtype=dtype, backend="eager")
    hf = getattr(transformers, class_name).from_pretrained(path, torch_dtype=dtype).eval()
    ids, mask = random_batch(ours.config.vocab_size, 2, 13, 3, padding=(None,))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask)
    assert torch.equal(ours(input_ids=ids, attention_mask=mask)[field], ref[field])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_inputs_embeds_on_a_half_precision_model(checkpoint_factory, dtype):
    """transformers takes fp32 embeddings into a bf16 / fp16 model (its first norm casts them; its
    residual stream then stays fp32, ours is the model's dtype): same-dtype tolerance of that dtype."""
    import transformers
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration")
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, dtype=dtype, backend="eager")
    hf = transformers.UMT5ForConditionalGeneration.from_pretrained(path, torch_dtype=dtype).eval()
    embeds = torch.randn(2, 9, ours.config.d_model, generator=torch.Generator().manual_seed(0))
    dec = torch.tensor([[0, 5, 6], [0, 7, 8]])
    with torch.no_grad():
        ref = hf(inputs_embeds=embeds, decoder_input_ids=dec, decoder_inputs_embeds=None).logits
        ref_dec = hf(input_ids=dec, decoder_inputs_embeds=hf.shared(dec).float()).logits
    assert_close(ours(inputs_embeds=embeds, decoder_input_ids=dec).logits.float(), ref.float(), 3e-2, "encoder embeds")
    assert_close(ours(input_ids=dec, decoder_inputs_embeds=ours.shared(dec).float()).logits.float(), ref_dec.float(),
                 3e-2, "decoder embeds")
    with pytest.raises(TypeError, match="dtype"):  # other float dtypes stay refused, as transformers fails on them
        ours(inputs_embeds=embeds.double(), decoder_input_ids=dec)
