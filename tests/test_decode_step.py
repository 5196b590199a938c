"""The cpu backend's C++ decode step (umt5_fast/decode_step.py, csrc/decoder_step.cpp) against the
Python path it replaces: logits and cache contents bit for bit, step after step, for every weight
format and instruction set; generation (greedy with finishing rows, beams, sampling) unchanged.
The Python path itself is tested against transformers (test_backends, test_generation)."""
import pytest
import torch

import umt5_fast
from umt5_fast import decode_step, generation
from helpers import random_batch

_C = pytest.importorskip("umt5_fast._C")

CONFIGS = {
    # 5 heads of 24, 3 decoder layers, max_distance 40 (the 45 steps below pass it)
    "odd-gated-gelu": dict(),
    "relu-ungated": dict(feed_forward_proj="relu", num_heads=3, d_kv=8, d_ff=33, num_decoder_layers=2,
                         relative_attention_num_buckets=8, relative_attention_max_distance=6),
    "tied-gated-silu": dict(feed_forward_proj="gated-silu", tie_word_embeddings=True, num_decoder_layers=1,
                            d_model=36, num_heads=7, d_kv=5),
}
MODES = [None, "bf16", "int8", "w8a8"]


def load(checkpoint_factory, config_name, mode, **kwargs):
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration", **CONFIGS[config_name])
    return umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="cpu", quantize=mode, **kwargs)


def encoded(model, batch: int, seed: int):
    ids, mask = random_batch(model.config.vocab_size, batch, 23, seed=seed)  # right, left and no padding
    with torch.inference_mode():
        states = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return states, mask


# (quantize, dtype): fp32 activations with each weight format, and a bf16 / fp16 model's
# activations with weights of its dtype (an fp16 model's `wo` fp32), int8 or W8A8 ones
PRECISIONS = ([(mode, torch.float32) for mode in MODES]
              + [(mode, dtype) for dtype in (torch.bfloat16, torch.float16) for mode in (None, "int8", "w8a8")])


@pytest.mark.usefixtures("every_cpu_isa")
@pytest.mark.parametrize("mode,dtype", PRECISIONS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_steps_equal_the_python_path(checkpoint_factory, config_name, mode, dtype):
    model = load(checkpoint_factory, config_name, mode, dtype=dtype)
    rows, steps = 3, 45
    states, mask = encoded(model, rows, seed=5)
    fast = generation.Decoder(model, states, mask, max_length=steps + 1)
    python = generation.Decoder(model, states, mask, max_length=steps + 1)
    assert fast.cpu_step is not None  # bf16 / fp16 models too, with or without AVX512-BF16
    python.cpu_step = None
    g = torch.Generator().manual_seed(6)
    tokens = torch.zeros(rows, 1, dtype=torch.long)
    with torch.inference_mode():
        for step in range(steps):
            if step:
                assert fast.cpu_step.accepts(tokens, fast.cache, fast.encoder_states)
            expected = python.step(tokens)
            got = fast.step(tokens)
            assert torch.equal(got, expected), f"step {step}: max diff {(got - expected).abs().max()}"
            tokens = torch.randint(0, model.config.vocab_size, (rows, 1), generator=g)
    assert torch.equal(fast.cache.keys, python.cache.keys) and torch.equal(fast.cache.values, python.cache.values)


GENERATE_CASES = [
    dict(max_new_tokens=14),  # rows finish at different steps: the decoder drops them
    dict(max_new_tokens=10, num_beams=3, num_return_sequences=2),  # beam reorders of the cache
    dict(max_new_tokens=10, do_sample=True, top_k=20, num_return_sequences=2),
]


@pytest.mark.parametrize("mode,dtype", [(None, torch.float32), ("w8a8", torch.float32), (None, torch.bfloat16),
                                        (None, torch.float16)])
@pytest.mark.parametrize("case", range(len(GENERATE_CASES)))
def test_generate_is_unchanged(checkpoint_factory, monkeypatch, case, mode, dtype):
    model = load(checkpoint_factory, "odd-gated-gelu", mode, dtype=dtype)
    ids, mask = random_batch(model.config.vocab_size, 4, 31, seed=case)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    counts = torch.bincount(greedy[:, 1:].flatten(), minlength=model.config.vocab_size)
    counts[0] = 0
    kwargs = dict(GENERATE_CASES[case], eos_token_id=int(counts.argmax()), output_scores=True,
                  return_dict_in_generate=True)

    def run():
        torch.manual_seed(7)
        return model.generate(ids, attention_mask=mask, **kwargs)

    built = []
    real_build = decode_step.build
    monkeypatch.setattr(decode_step, "build", lambda m: built.append(real_build(m)) or built[-1])
    fast = run()
    assert built and all(step is not None for step in built)
    monkeypatch.setattr(decode_step, "build", lambda m: None)
    python = run()
    assert torch.equal(fast.sequences, python.sequences)
    assert len(fast.scores) == len(python.scores)
    for got, expected in zip(fast.scores, python.scores):
        assert torch.equal(got, expected)


def test_models_it_does_not_cover_take_the_python_path(checkpoint_factory):
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration", **CONFIGS["odd-gated-gelu"])
    load_model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained
    assert decode_step.build(load_model(path, backend="eager")) is None
    fp16_model = load_model(path, backend="cpu", dtype=torch.float16)
    assert decode_step.build(fp16_model) is not None
    fp16_model.decoder.block[1].layer[0].SelfAttention.o.weight.data = \
        fp16_model.decoder.block[1].layer[0].SelfAttention.o.weight.float()  # only `wo` may be fp32
    assert decode_step.build(fp16_model) is None
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration", feed_forward_proj="gated-quick_gelu")
    assert decode_step.build(load_model(path, backend="cpu")) is None  # no C++ kernel for quick_gelu


def assert_step_declines_or_not(model, rows, seed, accepted):
    """Two steps of ``rows`` rows equal the Python path's, bit for bit, and the C++ step accepts
    them iff ``accepted`` (declining where the Python path would compute other bits)."""
    states, mask = encoded(model, rows, seed=seed)
    fast = generation.Decoder(model, states, mask, max_length=3)
    python = generation.Decoder(model, states, mask, max_length=3)
    python.cpu_step = None
    tokens = torch.zeros(rows, 1, dtype=torch.long)
    with torch.inference_mode():
        assert torch.equal(fast.step(tokens), python.step(tokens))
        assert fast.cpu_step.accepts(tokens, fast.cache, fast.encoder_states) == accepted
        assert torch.equal(fast.step(tokens), python.step(tokens))


def test_fp32_weights_take_the_step_only_up_to_the_kernel_rows(checkpoint_factory):
    """Above fp32_kernel_max_rows() the Python path multiplies fp32 weights with torch's GEMM: the
    step declines rather than give other bits; up to it (the GEMV, then from 33 rows the panel GEMM)
    it takes them, as it takes 8-bit weights of as many rows."""
    from umt5_fast.ops.cpu import fp32_kernel_max_rows
    model = load(checkpoint_factory, "relu-ungated", None)
    assert_step_declines_or_not(model, fp32_kernel_max_rows(), seed=8, accepted=True)
    assert_step_declines_or_not(model, fp32_kernel_max_rows() + 1, seed=8, accepted=False)
    assert_step_declines_or_not(load(checkpoint_factory, "relu-ungated", "int8"), 40, seed=8, accepted=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_half_precision_model_takes_the_step_only_up_to_the_half_kernel_rows(checkpoint_factory, dtype):
    """Above half_kernel_max_rows() the Python path multiplies bf16 / fp16 x with weights of its dtype
    (or int8, expanded) in a GEMM: the step declines there; W8A8 weights take the integer kernel at
    any size (and an fp16 model's fp32 `wo` the fp32 kernels up to fp32_kernel_max_rows())."""
    from umt5_fast.ops.cpu import fp32_kernel_max_rows, half_kernel_max_rows
    for mode, accepted in ((None, False), ("int8", False), ("w8a8", True)):
        model = load(checkpoint_factory, "relu-ungated", mode, dtype=dtype)
        assert_step_declines_or_not(model, half_kernel_max_rows(dtype) + 1, seed=8, accepted=accepted)
        assert_step_declines_or_not(model, half_kernel_max_rows(dtype), seed=8, accepted=True)
    if dtype == torch.float16:
        model = load(checkpoint_factory, "relu-ungated", "w8a8", dtype=dtype)
        model.decoder.block[0].layer[2].DenseReluDense.wo.weight = torch.nn.Parameter(
            torch.randn(model.config.d_model, model.config.d_ff) * 0.1, requires_grad=False)
        model.decoder.block[0].layer[2].DenseReluDense.wo.qweight = None
        assert_step_declines_or_not(model, fp32_kernel_max_rows() + 1, seed=8, accepted=False)
        assert_step_declines_or_not(model, fp32_kernel_max_rows(), seed=8, accepted=True)


def test_an_fp16_stream_that_overflows_is_clamped_as_the_python_path_clamps_it(checkpoint_factory):
    """An fp16 model with int8 weights keeps its residual stream in fp16 (no fp32 `wo`): an
    attention output past fp16's range makes it inf, and transformers' clamp then holds the whole
    batch to +-64512; the step does the same, bit for bit."""
    model = load(checkpoint_factory, "odd-gated-gelu", "int8", dtype=torch.float16)
    assert model.decoder.block[0].layer[2].DenseReluDense.wo.weight_dtype == torch.int8
    model.decoder.block[0].layer[0].SelfAttention.o.qscale.mul_(3e4)  # overflows fp16
    states, mask = encoded(model, 3, seed=2)
    fast = generation.Decoder(model, states, mask, max_length=4)
    python = generation.Decoder(model, states, mask, max_length=4)
    python.cpu_step = None
    tokens = torch.zeros(3, 1, dtype=torch.long)
    with torch.inference_mode():
        for _ in range(3):
            expected = python.step(tokens)
            assert torch.equal(fast.step(tokens), expected)
            tokens = expected.argmax(-1)[:, None] if expected.dim() == 2 else expected[:, -1].argmax(-1)[:, None]
    clamped = []
    block = model.decoder.block[0]
    block.register_forward_hook(lambda module, args, out: clamped.append(out[0]))
    python = generation.Decoder(model, states, mask, max_length=2)
    python.cpu_step = None
    with torch.inference_mode():
        python.step(torch.zeros(3, 1, dtype=torch.long))
    assert clamped and float(clamped[0].abs().max()) == 64512.0  # the clamp engaged


@pytest.mark.parametrize("mode", ["bf16", "int8", "w8a8"])
def test_weights_a_wide_gemm_would_take_decline_from_its_rows(checkpoint_factory, mode):
    """From WIDE_GEMM_MIN_ROWS rows on (AVX-512 CPUs) the Python path expands bf16 / int8 weights for
    a wide fp32 GEMM: the step declines there rather than give other bits; W8A8 stays in the integer kernel."""
    from umt5_fast.ops import cpu
    model = load(checkpoint_factory, "relu-ungated", mode)
    assert_step_declines_or_not(model, cpu.WIDE_GEMM_MIN_ROWS, seed=3,
                                accepted=mode == "w8a8" or not cpu.WIDE_GEMMS)


@pytest.mark.parametrize("mode", [None, "int8"])
def test_steps_that_reuse_memory_write_the_same_logits_into_it(checkpoint_factory, mode):
    """Decoding loops that keep no logits past a step let the decoder write them into the previous
    step's memory (cpu backend: no fresh [rows, vocab] pages a step); the values are those of a
    step into fresh memory."""
    model = load(checkpoint_factory, "relu-ungated", mode)
    states, mask = encoded(model, 40, seed=4)
    reusing = generation.Decoder(model, states, mask, max_length=4)
    fresh = generation.Decoder(model, states, mask, max_length=4)
    tokens = torch.zeros(40, 1, dtype=torch.long)
    with torch.inference_mode():
        first = reusing.step(tokens, reuse_memory=True)
        expected = fresh.step(tokens)
        assert torch.equal(first, expected) and first.data_ptr() != expected.data_ptr()
        kept = first.clone()
        second = reusing.step(tokens, reuse_memory=True)
        assert second.data_ptr() == first.data_ptr()  # the same memory, overwritten
        assert torch.equal(second, fresh.step(tokens)) and not torch.equal(second, kept)
        reusing.keep_rows(torch.arange(0, 40, 2))  # fewer rows: the front of the same memory
        fresh.keep_rows(torch.arange(0, 40, 2))
        third = reusing.step(tokens[:20], reuse_memory=True)
        assert third.data_ptr() == first.data_ptr() and torch.equal(third, fresh.step(tokens[:20]))


def test_a_full_cache_is_an_error_not_an_overwrite(checkpoint_factory):
    model = load(checkpoint_factory, "relu-ungated", None)
    states, mask = encoded(model, 2, seed=9)
    decoder = generation.Decoder(model, states, mask, max_length=2)
    tokens = torch.zeros(2, 1, dtype=torch.long)
    with torch.inference_mode():
        decoder.step(tokens)
        decoder.step(tokens)
        with pytest.raises(ValueError, match="longer than the cache allows"):
            decoder.step(tokens)
