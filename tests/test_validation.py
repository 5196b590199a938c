"""Bad input gets a clear error naming the argument and the problem (issue: reliability)."""
import threading

import pytest
import torch

import umt5_fast
from umt5_fast.cache import StaticCache
from helpers import random_batch


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration")
    return umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path)


GOOD = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
DEC = torch.tensor([[0, 5], [0, 6]])

FORWARD_CASES = [
    (dict(input_ids=torch.tensor([[5, 131, 1]]), decoder_input_ids=DEC[:1]), ValueError, r"input_ids.*131.*vocabulary"),
    (dict(input_ids=torch.tensor([[5, -2, 1]]), decoder_input_ids=DEC[:1]), ValueError, r"input_ids.*-2"),
    (dict(input_ids=GOOD.float(), decoder_input_ids=DEC), TypeError, r"input_ids.*integer"),
    (dict(input_ids=GOOD[0], decoder_input_ids=DEC), ValueError, r"input_ids.*shape \[batch, sequence_length\]"),
    (dict(input_ids=GOOD, attention_mask=MASK[:, :3], decoder_input_ids=DEC), ValueError, r"attention_mask.*shape"),
    (dict(input_ids=GOOD, attention_mask=MASK * 2, decoder_input_ids=DEC), ValueError, r"attention_mask.*0 and 1"),
    (dict(input_ids=GOOD[:0], decoder_input_ids=DEC[:0]), ValueError, r"input_ids.*empty batch"),
    (dict(input_ids=GOOD[:, :0], decoder_input_ids=DEC), ValueError, r"input_ids.*zero-length"),
    (dict(input_ids=GOOD, labels=torch.tensor([[5, 6, 7]]), decoder_input_ids=DEC), ValueError, r"labels"),
    (dict(input_ids=GOOD, labels=torch.tensor([[5.0, 6.0]])), TypeError, r"labels"),
    (dict(input_ids=GOOD), ValueError, r"decoder_input_ids"),
    (dict(input_ids=GOOD, decoder_input_ids=DEC[:1]), ValueError, r"batch size"),
    (dict(inputs_embeds=torch.zeros(2, 4, 40, dtype=torch.float64), decoder_input_ids=DEC), TypeError,
     r"inputs_embeds.*dtype"),
    (dict(inputs_embeds=torch.full((2, 4, 40), float("nan")), decoder_input_ids=DEC), ValueError,
     r"inputs_embeds.*NaN"),
    (dict(inputs_embeds=torch.zeros(2, 4, 39), decoder_input_ids=DEC), ValueError, r"inputs_embeds.*d_model=40"),
    (dict(input_ids=GOOD, inputs_embeds=torch.zeros(2, 4, 40), decoder_input_ids=DEC), ValueError,
     r"exactly one of input_ids and inputs_embeds"),
    (dict(input_ids=GOOD, decoder_input_ids=DEC, decoder_attention_mask=torch.ones(2, 3)), ValueError,
     r"decoder_attention_mask.*shape"),
    (dict(input_ids=GOOD, decoder_input_ids=DEC, head_mask=torch.ones(3)), ValueError, r"head_mask"),
    (dict(input_ids=GOOD, labels=torch.tensor([[5, 6, 7, 131], [5, -100, 7, 1]])), ValueError,
     r"labels holds 131, outside \[0, 131\)"),
    (dict(input_ids=GOOD, labels=torch.tensor([[5, 6, 7, -3], [5, -100, 7, 1]])), ValueError, r"labels holds -3"),
    (dict(encoder_outputs=(torch.zeros(2, 4, 39),), decoder_input_ids=DEC), ValueError,
     r"encoder_outputs \(last_hidden_state\) must have shape \[batch, sequence_length, d_model=40\]"),
    (dict(encoder_outputs=(torch.zeros(2, 4, 40, dtype=torch.float64),), decoder_input_ids=DEC), TypeError,
     r"encoder_outputs.*dtype torch.float64"),
    (dict(encoder_outputs=[[1, 2]], decoder_input_ids=DEC), TypeError, r"encoder_outputs.*torch.Tensor"),
    (dict(encoder_outputs=3, decoder_input_ids=DEC), TypeError, r"encoder_outputs must be"),
]


@pytest.mark.parametrize("kwargs,error,match", FORWARD_CASES)
def test_forward_rejects_bad_input(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        model(**kwargs)


def legacy_cache(config, batch=2, heads=None, d_kv=None, length=3, layers=None, cross=True):
    heads, d_kv = heads or config.num_heads, d_kv or config.d_kv
    kv = (torch.zeros(batch, heads, length, d_kv), torch.zeros(batch, heads, length, d_kv))
    return tuple(kv + (kv if cross else ()) for _ in range(layers or config.num_decoder_layers))


def test_legacy_caches_are_checked(model):
    cfg = model.config
    enc = torch.zeros(2, 4, cfg.d_model)
    step = dict(encoder_outputs=(enc,), decoder_input_ids=DEC[:, 1:])
    model(**step, past_key_values=legacy_cache(cfg))  # well formed: accepted
    model(**step, past_key_values=legacy_cache(cfg, cross=False))
    cases = [
        (legacy_cache(cfg, batch=5), ValueError, r"batch size 2 but past_key_values has batch size 5"),
        (legacy_cache(cfg, heads=cfg.num_heads + 1), ValueError, rf"past_key_values\[0\]\[0\] must have shape "
                                                                 rf"\[batch, num_heads={cfg.num_heads}"),
        (legacy_cache(cfg, d_kv=cfg.d_kv + 2), ValueError, rf"d_kv={cfg.d_kv}"),
        (legacy_cache(cfg, layers=cfg.num_decoder_layers + 1), ValueError, "per-layer tuples"),
        (tuple((1, 2) for _ in range(cfg.num_decoder_layers)), TypeError, r"past_key_values\[0\]\[0\] must be a torch.Tensor"),
        (tuple((torch.zeros(1),) * 3 for _ in range(cfg.num_decoder_layers)), ValueError, "2 or 4 tensors"),
        (tuple(tuple(t.double() for t in layer) for layer in legacy_cache(cfg)), TypeError, "dtype torch.float64"),
        (legacy_cache(cfg)[:-1] + ((torch.zeros(2, cfg.num_heads, 5, cfg.d_kv),) * 2,), ValueError,
         r"self-attention K/V have shapes"),
    ]
    for cache, error, match in cases:
        with pytest.raises(error, match=match):
            model(**step, past_key_values=cache)


def test_token_classification_labels_are_checked(checkpoint_factory):
    path, _ = checkpoint_factory("UMT5ForTokenClassification", num_labels=3)
    tagger = umt5_fast.UMT5ForTokenClassification.from_pretrained(path)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 4\)"):
        tagger(input_ids=GOOD, labels=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="labels"):
        tagger(input_ids=GOOD, labels=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"labels holds 3, outside \[0, 3\)"):
        tagger(input_ids=GOOD, labels=torch.full((2, 4), 3))
    assert torch.isfinite(tagger(input_ids=GOOD, labels=torch.zeros(2, 4, dtype=torch.int32)).loss)


def test_inputs_on_another_device_are_rejected(model):
    with pytest.raises(ValueError, match=r"input_ids is on meta"):
        model(input_ids=GOOD.to("meta"), decoder_input_ids=DEC)


GENERATE_CASES = [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(num_beams=0), "num_beams"), (dict(num_beams=2, num_return_sequences=4), "num_return_sequences"),
    (dict(do_sample=True, top_p=-0.01), "top_p"), (dict(do_sample=True, top_p=1.01), "top_p"),
    (dict(do_sample=True, temperature=0), "temperature"), (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(do_sample=True, temperature=1e-300), "temperature.*overflow"),
    (dict(do_sample=True, num_beams=2, temperature=1e-300), "temperature.*overflow"),
    (dict(decoder_start_token_id=10**6), "decoder_start_token_id"),
]


@pytest.mark.parametrize("kwargs,match", GENERATE_CASES)
def test_generate_rejects_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(GOOD, attention_mask=MASK, **kwargs)


def test_generate_rejects_bad_inputs(model):
    with pytest.raises(ValueError, match="input_ids.*vocabulary"):
        model.generate(torch.tensor([[1000]]))
    with pytest.raises(ValueError, match="input_ids is required"):
        model.generate(None)


def test_requests_longer_than_the_cache_are_rejected(model):
    cfg = model.config
    cache = StaticCache(cfg.num_decoder_layers, 2, cfg.num_heads, 3, cfg.d_kv, torch.float32, "cpu")
    with pytest.raises(ValueError, match="longer than the cache allows"):
        model(input_ids=GOOD, decoder_input_ids=torch.zeros(2, 5, dtype=torch.long), past_key_values=cache)


def test_unsupported_config_values_are_named(tmp_path, checkpoint_factory):
    import json
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration")
    config = json.loads((path / "config.json").read_text())
    config["feed_forward_proj"] = "gated-swiglu"
    del config["dense_act_fn"]  # (a config.json's own dense_act_fn wins, in transformers too)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="feed_forward_proj"):
        umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path)


def test_concurrent_generate_calls_match_serial_ones(model):
    """The model holds no per-call state: threads share it safely."""
    inputs = [random_batch(model.config.vocab_size, 2, 12 + i, seed=i) for i in range(4)]
    serial = [model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=1 + i % 2)
              for i, (ids, mask) in enumerate(inputs)]
    results = [None] * len(inputs)

    def work(i):
        ids, mask = inputs[i]
        results[i] = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=1 + i % 2)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(torch.equal(a, b) for a, b in zip(results, serial))


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_a_nan_weight_gives_nan_outputs_not_errors(checkpoint_factory, backend):
    """A corrupt (NaN) encoder weight flows through as in transformers: NaN logits, no error about
    encoder outputs the caller never passed, and no finite garbage from the fused kernels."""
    if backend not in umt5_fast.ops.available_backends():
        pytest.skip(f"{backend} backend not built")
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration")
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend=backend)
    with torch.no_grad():
        model.encoder.block[0].layer[0].SelfAttention.q.weight[0, 0] = float("nan")
    logits = model(input_ids=GOOD, attention_mask=MASK, decoder_input_ids=DEC).logits
    assert logits.isnan().all()


def test_a_cache_of_another_encoder_input_is_refused(model):
    past = model(input_ids=GOOD[:, :3], decoder_input_ids=DEC, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="cross-attention K/V of 3 encoder positions, but attention_mask covers 4"):
        model(input_ids=GOOD, attention_mask=MASK, decoder_input_ids=DEC[:, 1:], past_key_values=past)
    # the cache of this input continues it
    past = model(input_ids=GOOD, attention_mask=MASK, decoder_input_ids=DEC[:, :1], use_cache=True).past_key_values
    assert model(input_ids=GOOD, attention_mask=MASK, decoder_input_ids=DEC[:, 1:], past_key_values=past).logits.shape == (2, 1, 131)
