"""The whole model on each fused backend equals transformers.

cpu (C++ kernels): fp32 relative error <= 1e-5, generated ids identical.
triton (under TRITON_INTERPRET=1 on CPU tensors when there is no GPU): fp32 relative error <= 1e-4.
"""
import os

import pytest
import torch

import umt5_fast
from umt5_fast.ops import available_backends
from helpers import assert_close, random_batch

TOLERANCE = {"cpu": 1e-5, "triton": 1e-4}
CONFIGS = {
    "odd": dict(),  # 5 heads, d_kv 24, d_ff 72, 20 buckets, max_distance 40, 2+3 layers, untied
    "tied-silu": dict(feed_forward_proj="gated-silu", tie_word_embeddings=True, num_heads=3, d_kv=80,
                      num_layers=1, num_decoder_layers=2, relative_attention_num_buckets=32,
                      relative_attention_max_distance=17),
}
# max_distance not above the exact buckets (8 per direction in the encoder, 16 in the decoder): only
# distances below those are defined, so inputs stay within 8 / 16 tokens (not in CONFIGS' loops)
SHORT_MAX_DISTANCE = dict(relative_attention_num_buckets=32, relative_attention_max_distance=7, num_layers=1,
                          num_decoder_layers=2)
ALL_CONFIGS = dict(CONFIGS, **{"short-max-distance": SHORT_MAX_DISTANCE})


def backends():
    names = []
    if "cpu" in available_backends():
        names.append("cpu")
    try:
        import triton  # noqa: F401
        if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            names.append("triton")
    except ImportError:
        pass
    return names or [pytest.param("none", marks=pytest.mark.skip(reason="no fused backend available"))]


def load(checkpoint_factory, config_name, class_name, backend):
    path, hf = checkpoint_factory(class_name, **ALL_CONFIGS[config_name])
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    ours = getattr(umt5_fast, class_name).from_pretrained(path, backend=backend, device=device)
    assert ours.backend == backend
    return ours, hf, device


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_seq2seq_logits_match_transformers(checkpoint_factory, backend, config_name):
    ours, hf, device = load(checkpoint_factory, config_name, "UMT5ForConditionalGeneration", backend)
    length = 45 if backend == "cpu" else 21  # past max_distance either way; the interpreter is slow
    ids, mask = random_batch(ours.config.vocab_size, 3, length, seed=1)
    dec, dec_mask = random_batch(ours.config.vocab_size, 3, 9, seed=2, padding=("right", None))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    out = ours(input_ids=ids.to(device), attention_mask=mask.to(device), decoder_input_ids=dec.to(device),
               decoder_attention_mask=dec_mask.to(device))
    assert_close(out.encoder_last_hidden_state.cpu(), ref.encoder_last_hidden_state, TOLERANCE[backend], "encoder")
    assert_close(out.logits.cpu(), ref.logits, TOLERANCE[backend], "logits")


@pytest.mark.parametrize("backend", backends())
def test_a_max_distance_below_the_log_buckets_matches_transformers_within_its_defined_lengths(
        checkpoint_factory, backend):
    """Such a config defines no bucket for far distances: inputs up to the longest defined one
    match transformers (the kernels' tail lanes past the sequence have no bucket and are discarded;
    tests/kernels/test_bucket.py holds their table reads inside the table), longer ones are refused."""
    ours, hf, device = load(checkpoint_factory, "short-max-distance", "UMT5ForConditionalGeneration", backend)
    ids, mask = random_batch(ours.config.vocab_size, 3, 8, seed=8)
    dec, dec_mask = random_batch(ours.config.vocab_size, 3, 16, seed=9, padding=("right", None))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None, use_cache=False)
    out = ours(input_ids=ids.to(device), attention_mask=mask.to(device), decoder_input_ids=dec.to(device),
               decoder_attention_mask=dec_mask.to(device))
    assert_close(out.encoder_last_hidden_state.cpu(), ref.encoder_last_hidden_state, TOLERANCE[backend], "encoder")
    assert_close(out.logits.cpu(), ref.logits, TOLERANCE[backend], "logits")
    got = ours.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=5, eos_token_id=None)
    assert torch.equal(got.cpu(), expected)
    longer = torch.cat([ids, ids[:, :1]], dim=1).to(device)
    with pytest.raises(ValueError, match="the encoder input may hold at most 8 tokens"):
        ours(input_ids=longer, decoder_input_ids=dec.to(device))


@pytest.mark.parametrize("backend", backends())
def test_generation_matches_transformers(checkpoint_factory, backend):
    ours, hf, device = load(checkpoint_factory, "odd", "UMT5ForConditionalGeneration", backend)
    interpreted = backend == "triton" and device == "cpu"  # the Triton interpreter is slow
    ids, mask = random_batch(ours.config.vocab_size, 2 if interpreted else 3, 20 if interpreted else 30, seed=3)
    steps = 3 if interpreted else 10
    for kwargs in (dict(max_new_tokens=steps), dict(max_new_tokens=steps, num_beams=3)):
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
        got = ours.generate(ids.to(device), attention_mask=mask.to(device), **kwargs)
        assert torch.equal(got.cpu(), expected), kwargs


@pytest.mark.parametrize("backend", backends())
def test_encoder_model_matches_transformers(checkpoint_factory, backend):
    ours, hf, device = load(checkpoint_factory, "tied-silu", "UMT5EncoderModel", backend)
    ids, mask = random_batch(ours.config.vocab_size, 2, 37 if backend == "cpu" else 19, seed=4)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    out = ours(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    assert_close(out.cpu(), ref, TOLERANCE[backend], "encoder")


def test_auto_backend_picks_the_cpu_kernels_when_built(checkpoint_factory):
    path, _ = checkpoint_factory("UMT5EncoderModel", **CONFIGS["odd"])
    model = umt5_fast.UMT5EncoderModel.from_pretrained(path)
    assert model.backend == available_backends()[0]


@pytest.mark.parametrize("backend", ["eager", *backends()])
def test_rows_and_queries_that_see_no_key_match_transformers(checkpoint_factory, backend):
    """A row of padding only (encoder), a decoder row of padding only and left-padded decoder rows
    (queries before the first real token see no key): transformers' additive finfo.min mask makes
    such a query attend to every key alike; ours too, on every backend, in forward and generate."""
    ours, hf, device = load(checkpoint_factory, "odd", "UMT5ForConditionalGeneration", backend)
    interpreted = backend == "triton" and device == "cpu"
    ids, mask = random_batch(ours.config.vocab_size, 4, 19 if interpreted else 45, seed=6)
    mask[1] = 0
    dec, dec_mask = random_batch(ours.config.vocab_size, 4, 7, seed=7, padding=(None,))
    dec_mask[0] = 0
    dec_mask[2, :3] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    out = ours(input_ids=ids.to(device), attention_mask=mask.to(device), decoder_input_ids=dec.to(device),
               decoder_attention_mask=dec_mask.to(device))
    tolerance = TOLERANCE.get(backend, 0.0)  # eager: transformers' own ops, the same bits
    assert_close(out.encoder_last_hidden_state.cpu(), ref.encoder_last_hidden_state, tolerance, "encoder")
    assert_close(out.logits.cpu(), ref.logits, tolerance, "logits")
    for kwargs in (dict(max_new_tokens=3 if interpreted else 8), dict(max_new_tokens=3, num_beams=2)):
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
        assert torch.equal(ours.generate(ids.to(device), attention_mask=mask.to(device), **kwargs).cpu(), expected)
