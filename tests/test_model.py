"""The six task classes against transformers' UMT5 (the oracle) on random-weight checkpoints.

fp32 tolerance: relative error <= 1e-5 (max abs difference over max abs reference value).
"""
import pytest
import torch

import umt5_fast
from helpers import assert_close, random_batch

TOL = 1e-5
CONFIGS = {
    # 5 heads x d_kv 24 != d_model 40, 20 buckets, max_distance 40 (inputs are longer), 2+3 layers
    "odd-untied": dict(),
    "tied-relu": dict(feed_forward_proj="relu", tie_word_embeddings=True, num_decoder_layers=1),
    "gated-silu": dict(feed_forward_proj="gated-silu", num_layers=1, num_decoder_layers=2, num_heads=3,
                       d_kv=16, relative_attention_num_buckets=8, relative_attention_max_distance=16),
    "gelu-erf": dict(feed_forward_proj="gelu", relative_attention_num_buckets=32,
                     relative_attention_max_distance=128, num_heads=2, d_kv=20),
}


def load_pair(checkpoint_factory, class_name, config_name, backend="eager", **overrides):
    path, hf = checkpoint_factory(class_name, **dict(CONFIGS[config_name], **overrides))
    ours = getattr(umt5_fast, class_name).from_pretrained(path, backend=backend)
    return ours, hf


def inputs(vocab, seed, batch=3, length=53, dec_length=47):
    ids, mask = random_batch(vocab, batch, length, seed)
    dec, dec_mask = random_batch(vocab, batch, dec_length, seed + 1, padding=("right", None))
    return ids, mask, dec, dec_mask


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_conditional_generation_matches_transformers(checkpoint_factory, config_name):
    ours, hf = load_pair(checkpoint_factory, "UMT5ForConditionalGeneration", config_name)
    ids, mask, dec, dec_mask = inputs(ours.config.vocab_size, seed=hash(config_name) % 1000)
    labels = dec.masked_fill(dec_mask == 0, -100)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dec_mask,
                 output_hidden_states=True)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dec_mask,
               output_hidden_states=True)
    assert_close(out.logits, ref.logits, TOL, "logits")
    assert_close(out.loss, ref.loss, TOL, "loss")
    assert_close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, TOL, "encoder output")
    assert len(out.encoder_hidden_states) == len(ref.encoder_hidden_states)
    for ours_h, ref_h in zip(out.encoder_hidden_states + out.decoder_hidden_states,
                             ref.encoder_hidden_states + ref.decoder_hidden_states):
        assert_close(ours_h, ref_h, TOL, "hidden states")


@pytest.mark.parametrize("config_name", ["odd-untied", "tied-relu"])
def test_model_and_encoder_match_transformers(checkpoint_factory, config_name):
    ours, hf = load_pair(checkpoint_factory, "UMT5Model", config_name)
    ids, mask, dec, dec_mask = inputs(ours.config.vocab_size, seed=7)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    out = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    assert_close(out.last_hidden_state, ref.last_hidden_state, TOL, "decoder output")

    enc, hf_enc = load_pair(checkpoint_factory, "UMT5EncoderModel", config_name)
    with torch.no_grad():
        ref = hf_enc(input_ids=ids, attention_mask=mask)
    assert_close(enc(input_ids=ids, attention_mask=mask).last_hidden_state, ref.last_hidden_state, TOL,
                 "encoder model")


def test_encoder_model_loads_seq2seq_checkpoint_reading_only_the_encoder(checkpoint_factory):
    path, hf = checkpoint_factory("UMT5ForConditionalGeneration", **CONFIGS["odd-untied"])
    enc = umt5_fast.UMT5EncoderModel.from_pretrained(path, backend="eager")
    ids, mask = random_batch(enc.config.vocab_size, 2, 30, 3)
    with torch.no_grad():
        ref = hf.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close(enc(ids, attention_mask=mask).last_hidden_state, ref, TOL, "encoder")
    assert not any(name.startswith("decoder") for name, _ in enc.named_parameters())


@pytest.mark.parametrize("num_labels,label_kind", [(3, "single"), (1, "regression"), (4, "multi")])
def test_sequence_classification_matches_transformers(checkpoint_factory, num_labels, label_kind):
    ours, hf = load_pair(checkpoint_factory, "UMT5ForSequenceClassification", "odd-untied", num_labels=num_labels)
    g = torch.Generator().manual_seed(num_labels)
    # each row holds exactly one eos (random_batch ends every row with eos before the padding)
    ids, mask = random_batch(ours.config.vocab_size, 3, 45, seed=11, padding=("right", None))
    labels = {"single": torch.randint(0, num_labels, (3,), generator=g),
              "regression": torch.randn(3, generator=g),
              "multi": torch.randint(0, 2, (3, num_labels), generator=g).float()}[label_kind]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(out.logits, ref.logits, TOL, "logits")
    assert_close(out.loss, ref.loss, TOL, "loss")
    assert ours.config.problem_type == hf.config.problem_type


def test_sequence_classification_rejects_unequal_eos_counts(checkpoint_factory):
    ours, _ = load_pair(checkpoint_factory, "UMT5ForSequenceClassification", "odd-untied", num_labels=2)
    ids = torch.tensor([[5, 6, 1, 7, 1], [5, 6, 7, 8, 1]])
    with pytest.raises(ValueError, match="same number of <eos>"):
        ours(input_ids=ids)


def test_token_classification_matches_transformers(checkpoint_factory):
    ours, hf = load_pair(checkpoint_factory, "UMT5ForTokenClassification", "odd-untied", num_labels=5)
    ids, mask = random_batch(ours.config.vocab_size, 3, 41, seed=5)
    labels = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(out.logits, ref.logits, TOL, "logits")
    assert_close(out.loss, ref.loss, TOL, "loss")


def test_question_answering_matches_transformers(checkpoint_factory):
    ours, hf = load_pair(checkpoint_factory, "UMT5ForQuestionAnswering", "odd-untied", num_labels=2)
    ids, mask = random_batch(ours.config.vocab_size, 3, 44, seed=9)
    start, end = torch.tensor([1, 5, 50]), torch.tensor([3, 9, 2])  # 50 is past the end: ignored
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, start_positions=start, end_positions=end)
    out = ours(input_ids=ids, attention_mask=mask, start_positions=start, end_positions=end)
    assert_close(out.start_logits, ref.start_logits, TOL, "start logits")
    assert_close(out.end_logits, ref.end_logits, TOL, "end logits")
    assert_close(out.loss, ref.loss, TOL, "loss")


def test_attentions_and_head_mask_match_transformers(checkpoint_factory):
    ours, hf = load_pair(checkpoint_factory, "UMT5ForConditionalGeneration", "odd-untied")
    ids, mask, dec, dec_mask = inputs(ours.config.vocab_size, seed=21, length=23, dec_length=9)
    g = torch.Generator().manual_seed(0)
    head_mask = torch.randint(0, 2, (2, 5), generator=g).float()
    decoder_head_mask = torch.rand(3, 5, generator=g)
    cross_mask = torch.rand(5, generator=g)
    kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_attentions=True,
                  head_mask=head_mask, decoder_head_mask=decoder_head_mask, cross_attn_head_mask=cross_mask)
    with torch.no_grad():
        ref = hf(**kwargs)
    out = ours(**kwargs)
    assert_close(out.logits, ref.logits, TOL, "logits")
    for name in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        for a, b in zip(getattr(out, name), getattr(ref, name)):
            assert_close(a, b, TOL, name)


def test_incremental_decoding_with_past_key_values_matches_full_pass(checkpoint_factory):
    ours, hf = load_pair(checkpoint_factory, "UMT5ForConditionalGeneration", "odd-untied")
    ids, mask, dec, _ = inputs(ours.config.vocab_size, seed=3, length=30, dec_length=12)
    full = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
    enc = ours.get_encoder()(input_ids=ids, attention_mask=mask)
    out = ours(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec[:, :5], use_cache=True)
    steps = [out.logits]
    past = out.past_key_values
    for t in range(5, 12):
        out = ours(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec[:, t:t + 1],
                   past_key_values=past, use_cache=True)
        past = out.past_key_values
        steps.append(out.logits)
    assert_close(torch.cat(steps, dim=1), full, TOL, "incremental logits")
    # and the legacy tuple format round-trips
    legacy = past.to_legacy_cache()
    assert len(legacy) == ours.config.num_decoder_layers and len(legacy[0]) == 4
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
    assert_close(full, ref, TOL, "full logits")


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_four_dimensional_decoder_masks_match_transformers(checkpoint_factory, backend):
    """A 4-D decoder_attention_mask is added to the scores in place of the causal and padding masks,
    as transformers adds it: the causal + padding masks in that form, a mask per head of its own, and
    one over a cache (the queries after the cached positions); a bool (0/1) or mis-shaped one is an
    error naming its form."""
    if backend not in umt5_fast.ops.available_backends():
        pytest.skip(f"no {backend} backend")
    ours, hf = load_pair(checkpoint_factory, "UMT5ForConditionalGeneration", "odd-untied", backend=backend)
    heads = ours.config.num_heads
    ids, mask, dec, _ = inputs(ours.config.vocab_size, seed=8, length=30, dec_length=13)
    lowest = torch.finfo(torch.float32).min
    causal = torch.triu(torch.full((13, 13), lowest), 1)[None, None].repeat(3, 1, 1, 1)
    causal[1, :, :, :2] = lowest  # row 1's decoder input left-padded by two
    causal[1, :, :2, :2] = torch.triu(torch.full((2, 2), lowest), 1)  # (its padded queries see themselves)
    own = torch.where(torch.rand(3, heads, 13, 13, generator=torch.Generator().manual_seed(3)) < 0.4, lowest, 0.0)
    own[..., 0] = 0.0
    for name, four_d in (("causal + padding", causal), ("per head", own)):
        with torch.no_grad():
            expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                          decoder_attention_mask=four_d).logits
        got = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=four_d)
        assert_close(got.logits, expected, TOL, name)
    # over a cache: 8 positions first, then 5 queries against all 13 keys
    with torch.no_grad():
        first = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, :8],
                   decoder_attention_mask=own[:, :, :8, :8], use_cache=True)
        expected = hf(encoder_outputs=(first.encoder_last_hidden_state,), attention_mask=mask,
                      decoder_input_ids=dec[:, 8:], decoder_attention_mask=own[:, :, 8:],
                      past_key_values=first.past_key_values).logits
    cached = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, :8],
                  decoder_attention_mask=own[:, :, :8, :8], use_cache=True)
    got = ours(encoder_outputs=(cached.encoder_last_hidden_state,), attention_mask=mask, decoder_input_ids=dec[:, 8:],
               decoder_attention_mask=own[:, :, 8:], past_key_values=cached.past_key_values).logits
    assert_close(got, expected, TOL, "over a cache")
    for bad, match in ((causal == 0, "floating mask"), (causal[:, :, :12], r"\[3 or 1, .* or 1, 13, >= 13\]"),
                       (causal[:, :, :, :12], ">= 13")):
        with pytest.raises(ValueError, match=match):
            ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=bad)


def test_inputs_embeds_and_encoder_outputs_and_tuple_outputs(checkpoint_factory):
    ours, hf = load_pair(checkpoint_factory, "UMT5ForConditionalGeneration", "tied-relu")
    ids, mask, dec, _ = inputs(ours.config.vocab_size, seed=4, length=19, dec_length=6)
    embeds = ours.shared.weight[ids]
    dec_embeds = ours.shared.weight[dec]
    with torch.no_grad():
        ref = hf(inputs_embeds=embeds, attention_mask=mask, decoder_inputs_embeds=dec_embeds, return_dict=False)
    out = ours(inputs_embeds=embeds, attention_mask=mask, decoder_inputs_embeds=dec_embeds, return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(ref)
    assert_close(out[0], ref[0], TOL, "logits via tuple")
    enc = ours.get_encoder()(input_ids=ids, attention_mask=mask)
    via_tuple = ours(encoder_outputs=(enc.last_hidden_state,), attention_mask=mask, decoder_input_ids=dec)
    direct = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    assert torch.equal(via_tuple.logits, direct.logits)
    assert direct["logits"] is direct.logits and direct[0] is direct.logits
    assert list(direct.keys())[:2] == ["logits", "past_key_values"]


def test_shift_right_matches_transformers(checkpoint_factory):
    ours, hf = load_pair(checkpoint_factory, "UMT5ForConditionalGeneration", "odd-untied")
    labels = torch.tensor([[5, 6, -100, -100], [7, -100, 8, 1]])
    assert torch.equal(ours._shift_right(labels), hf._shift_right(labels))


def test_model_properties(checkpoint_factory):
    ours, _ = load_pair(checkpoint_factory, "UMT5ForConditionalGeneration", "odd-untied")
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    assert ours.config.num_heads * ours.config.d_kv != ours.config.d_model
    assert ours.get_encoder() is ours.encoder


def test_model_objects_behave_like_transformers(checkpoint_factory):
    """deepcopy / pickle, config.return_dict, editable outputs (no inference tensors), embeddings
    accessors and parameter counts."""
    import copy
    import pickle
    path, hf = checkpoint_factory("UMT5ForConditionalGeneration")
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path)
    ids = torch.tensor([[5, 6, 7, 1]])
    dec = torch.tensor([[0, 5]])
    expected = model(input_ids=ids, decoder_input_ids=dec).logits
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(input_ids=ids, decoder_input_ids=dec).logits, expected)
    assert model.config.return_dict is True
    model.config.return_dict = False
    assert isinstance(model(input_ids=ids, decoder_input_ids=dec), tuple)
    model.config.return_dict = True
    logits = model(input_ids=ids, decoder_input_ids=dec).logits
    logits[..., 5] = -float("inf")  # post-processing in place, as under transformers' no_grad
    assert model.num_parameters() == hf.num_parameters()
    assert model.get_output_embeddings() is model.lm_head
    embedding = torch.nn.Embedding(model.config.vocab_size, model.config.d_model)
    model.set_input_embeddings(embedding)
    assert model.encoder.embed_tokens is embedding and model.decoder.embed_tokens is embedding
    with pytest.raises(ValueError, match="set_input_embeddings takes an nn.Embedding of shape"):
        model.set_input_embeddings(torch.nn.Embedding(3, model.config.d_model))
    with pytest.raises(NotImplementedError, match="inference-only"):
        model.resize_token_embeddings(10)


def test_tie_weights_reties_the_head_to_new_input_embeddings(checkpoint_factory):
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration", tie_word_embeddings=True)
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path)
    assert model.lm_head.weight is model.shared.weight
    embedding = torch.nn.Embedding(model.config.vocab_size, model.config.d_model)
    model.set_input_embeddings(embedding)
    model.tie_weights()
    assert model.lm_head.weight is embedding.weight


NEW_ACTIVATIONS = ["gelu_accurate", "gelu_python", "gelu_python_tanh", "gelu_10", "relu2", "laplace"]


@pytest.mark.parametrize("backend", ["eager", "cpu"])
@pytest.mark.parametrize("overrides", [dict(feed_forward_proj=f"gated-{act}") for act in NEW_ACTIVATIONS]
                         + [dict(feed_forward_proj="gated-gelu", dense_act_fn="relu", is_gated_act=False)])
def test_every_transformers_ffn_activation_matches(checkpoint_factory, backend, overrides):
    """Every activation transformers' ACT2FN offers a T5 FFN, and a config.json whose own
    dense_act_fn / is_gated_act override feed_forward_proj (transformers honours them)."""
    if backend not in umt5_fast.ops.available_backends():
        pytest.skip(f"backend {backend} not built")
    ours, hf = load_pair(checkpoint_factory, "UMT5ForConditionalGeneration", "gated-silu", backend, **overrides)
    assert (ours.config.dense_act_fn, ours.config.is_gated_act) == (hf.config.dense_act_fn, hf.config.is_gated_act)
    ids, mask, dec, dec_mask = inputs(ours.config.vocab_size, seed=31, length=21, dec_length=9)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    out = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    assert_close(out.logits, ref.logits, TOL, "logits")


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_max_distance_below_the_log_buckets_works_where_buckets_are_defined(checkpoint_factory, backend):
    """relative_attention_max_distance not above where the log buckets start (32 buckets: 8 in the
    encoder, 16 in the decoder) leaves only the exact buckets defined: distances below that point
    match transformers, and longer sequences are refused with the reason, never computed wrong."""
    if backend not in umt5_fast.ops.available_backends():
        pytest.skip(f"backend {backend} not built")
    shape = dict(relative_attention_num_buckets=32, relative_attention_max_distance=12, num_layers=1,
                 num_decoder_layers=2)
    encoder, hf_encoder = load_pair(checkpoint_factory, "UMT5EncoderModel", "odd-untied", backend, **shape)
    ids, mask = random_batch(encoder.config.vocab_size, 2, 60, seed=4)  # past max_distance: log buckets
    with torch.no_grad():
        ref = hf_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close(encoder(input_ids=ids, attention_mask=mask).last_hidden_state, ref, TOL, "encoder")

    ours, hf = load_pair(checkpoint_factory, "UMT5ForConditionalGeneration", "odd-untied", backend, **shape)
    dec = torch.randint(2, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert_close(ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, ref, TOL, "logits")
    long_dec = torch.cat([dec, dec[:, :1]], dim=1)
    with pytest.raises(ValueError, match="relative_attention_max_distance=12 .* at most 16 tokens"):
        ours(input_ids=ids, attention_mask=mask, decoder_input_ids=long_dec)
    with torch.no_grad():  # 16 new tokens: the decoder reads 16 (the last one is never fed back)
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None, use_cache=False)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None), expected)
    with pytest.raises(ValueError, match="at most 16 tokens"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=17, eos_token_id=None)
    with pytest.raises(ValueError, match="the encoder input may hold at most 8 tokens"):
        load_pair(checkpoint_factory, "UMT5EncoderModel", "odd-untied", backend,
                  **dict(shape, relative_attention_max_distance=7))[0](input_ids=ids)


def _layout(value):
    """A tuple output's structure: tensors by shape, nested tuples recursively, caches by kind."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return [_layout(v) for v in value]
    return "cache" if hasattr(value, "get_seq_length") else type(value).__name__


def _flat_tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat_tensors(v)]
    return []


@pytest.mark.parametrize("class_name,extra", [
    ("UMT5ForConditionalGeneration", dict(labels=True)), ("UMT5Model", {}), ("UMT5EncoderModel", {}),
    ("UMT5ForSequenceClassification", dict(num_labels=3, labels=True)),
    ("UMT5ForTokenClassification", dict(num_labels=4, labels=True)),
    ("UMT5ForQuestionAnswering", dict(num_labels=2, labels=True))])
@pytest.mark.parametrize("flags", [dict(), dict(output_hidden_states=True),
                                   dict(output_hidden_states=True, output_attentions=True)])
def test_tuple_outputs_have_transformers_layout(checkpoint_factory, class_name, extra, flags):
    """return_dict=False: the same items in the same order and nesting as transformers (its
    token classifier's odd (loss, logits, ()) included), each equal to its counterpart."""
    extra = dict(extra)
    with_labels = extra.pop("labels", False)
    ours, hf = load_pair(checkpoint_factory, class_name, "tied-relu", **extra)
    ids, mask = random_batch(ours.config.vocab_size, 2, 13, seed=17, padding=("right", None))
    kwargs = dict(input_ids=ids, attention_mask=mask, return_dict=False, **flags)
    if class_name in ("UMT5ForConditionalGeneration", "UMT5Model"):
        kwargs["decoder_input_ids"] = ids[:, :6]
    if with_labels:
        if class_name == "UMT5ForQuestionAnswering":
            kwargs.update(start_positions=torch.tensor([1, 4]), end_positions=torch.tensor([3, 7]))
        elif class_name == "UMT5ForSequenceClassification":
            kwargs["labels"] = torch.tensor([0, 2])
        elif class_name == "UMT5ForTokenClassification":
            kwargs["labels"] = torch.randint(0, 4, ids.shape)
        else:
            kwargs["labels"] = ids[:, :6].contiguous()
            del kwargs["decoder_input_ids"]
    with torch.no_grad():
        ref = hf(**kwargs)
    out = ours(**kwargs)
    assert _layout(out) == _layout(ref)
    for ours_t, ref_t in zip(_flat_tensors(out), _flat_tensors(ref)):
        assert_close(ours_t, ref_t, TOL, class_name)


@pytest.mark.parametrize("backend", ["eager", "cpu"])
@pytest.mark.parametrize("start", ["transformers-prefill", "empty"])
def test_a_transformers_cache_object_is_updated_in_place(checkpoint_factory, backend, start):
    """Loops that pass one transformers EncoderDecoderCache on, as transformers updates it in place
    (and an empty one the caller made), give the full pass's logits; the object is returned."""
    from transformers.cache_utils import DynamicCache as HFDynamicCache, EncoderDecoderCache
    ours, hf = load_pair(checkpoint_factory, "UMT5ForConditionalGeneration", "odd-untied", backend=backend,
                         num_decoder_layers=2)
    ids, mask, dec, _ = inputs(ours.config.vocab_size, seed=8, length=23, dec_length=7)
    with torch.no_grad():
        full = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        if start == "empty":
            cache, first = EncoderDecoderCache(HFDynamicCache(), HFDynamicCache()), 0
        else:
            cache = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, :2], use_cache=True).past_key_values
            first = 2
    for t in range(first, 7):
        out = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, t:t + 1], past_key_values=cache,
                   use_cache=True)
        assert out.past_key_values is cache and cache.get_seq_length() == t + 1
        assert_close(out.logits[:, 0], full[:, t], TOL, f"step {t}")
    # use_cache=False with a cache passed: transformers still returns (and extends) it
    out = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, :1], past_key_values=cache,
               use_cache=False, return_dict=False)
    assert len(out) == 3 and out[1] is cache


def test_our_cache_has_transformers_cache_methods(checkpoint_factory):
    """reorder_cache / batch_select_indices / batch_repeat_interleave / crop / indexing, as a
    hand-written beam search calls them on transformers' caches."""
    ours, hf = load_pair(checkpoint_factory, "UMT5ForConditionalGeneration", "odd-untied")
    ids, mask, dec, _ = inputs(ours.config.vocab_size, seed=9, length=15, dec_length=6)
    enc = ours.get_encoder()(input_ids=ids, attention_mask=mask)
    full = ours(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec).logits

    def prefill(n):
        return ours(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec[:, :n], use_cache=True).past_key_values

    def step(cache, rows, t):
        return ours(encoder_outputs=type(enc)(enc.last_hidden_state[rows]), attention_mask=mask[rows],
                    decoder_input_ids=dec[rows, t:t + 1], past_key_values=cache).logits[:, 0]

    order = torch.tensor([2, 0, 2])
    cache = prefill(4)
    cache.reorder_cache(order)
    assert_close(step(cache, order, 4), full[order, 4], TOL, "reorder_cache")
    cache = prefill(4)
    cache.batch_repeat_interleave(2)
    assert_close(step(cache, torch.arange(3).repeat_interleave(2), 4), full[:, 4].repeat_interleave(2, dim=0),
                 TOL, "batch_repeat_interleave")
    cache = prefill(5)
    cache.crop(-2)
    assert cache.get_seq_length() == 3
    assert_close(step(cache, torch.arange(3), 3), full[:, 3], TOL, "crop")
    cache.batch_select_indices(torch.tensor([1]))
    assert len(cache) == ours.config.num_decoder_layers and len(cache[0]) == 4 and cache[0][0].shape[0] == 1
    assert len(list(cache)) == len(cache)


def test_transformers_caches_made_from_a_config_start_empty(checkpoint_factory):
    import transformers
    from transformers.cache_utils import DynamicCache as HFDynamicCache, EncoderDecoderCache
    ours, hf = load_pair(checkpoint_factory, "UMT5ForConditionalGeneration", "odd-untied", num_decoder_layers=2)
    ids, mask, dec, _ = inputs(ours.config.vocab_size, seed=10, length=9, dec_length=3)
    hf_config = transformers.UMT5Config.from_pretrained(ours.config.name_or_path)
    cache = EncoderDecoderCache(HFDynamicCache(config=hf_config), HFDynamicCache(config=hf_config))
    out = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, past_key_values=cache, use_cache=True)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert out.past_key_values is cache and cache.get_seq_length() == 3
    assert_close(out.logits, ref, TOL, "logits")
    empty = umt5_fast.cache.DynamicCache(2)
    assert len(empty) == 0 and list(empty) == []


def test_a_transformers_cache_too_small_for_the_decoder_is_refused_before_it_is_written(checkpoint_factory):
    """DynamicCache(config=...) holds config.num_layers layers (the encoder's 2 here) and cannot grow
    to the decoder's 3: transformers fails with an IndexError; we name the problem, cache untouched."""
    import transformers
    from transformers.cache_utils import DynamicCache as HFDynamicCache, EncoderDecoderCache
    ours, hf = load_pair(checkpoint_factory, "UMT5ForConditionalGeneration", "odd-untied")
    assert (ours.config.num_layers, ours.config.num_decoder_layers) == (2, 3)
    ids, mask, dec, _ = inputs(ours.config.vocab_size, seed=10, length=9, dec_length=3)
    hf_config = transformers.UMT5Config.from_pretrained(ours.config.name_or_path)
    for cache in (EncoderDecoderCache(HFDynamicCache(config=hf_config), HFDynamicCache(config=hf_config)),
                  EncoderDecoderCache(HFDynamicCache(), HFDynamicCache(config=hf_config)),
                  HFDynamicCache(config=hf_config)):
        with pytest.raises(ValueError, match="holds 2 layers and cannot grow, but the decoder has 3"):
            ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 0
    with pytest.raises(IndexError):  # what transformers does with it
        hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=True,
           past_key_values=EncoderDecoderCache(HFDynamicCache(config=hf_config), HFDynamicCache(config=hf_config)))
