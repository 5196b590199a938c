"""The model object around forward: what code written for transformers' PreTrainedModel calls."""
import copy
import json
import pickle

import pytest
import torch

import umt5_fast
from umt5_fast.ops import available_backends
from helpers import assert_close, random_batch

BACKEND = available_backends()[0]


@pytest.fixture(scope="module")
def seq2seq(checkpoint_factory):
    return checkpoint_factory("UMT5ForConditionalGeneration")


@pytest.mark.parametrize("class_name", ["UMT5ForSequenceClassification", "UMT5ForTokenClassification",
                                        "UMT5ForConditionalGeneration", "UMT5EncoderModel"])
def test_set_input_embeddings_reaches_every_stack(checkpoint_factory, class_name):
    path, hf = checkpoint_factory(class_name, num_labels=3)
    ours = getattr(umt5_fast, class_name).from_pretrained(path, backend=BACKEND)
    hf = copy.deepcopy(hf)
    table = torch.nn.Embedding(ours.config.vocab_size, ours.config.d_model)
    torch.nn.init.normal_(table.weight, std=3.0)
    ours.set_input_embeddings(table)
    hf.set_input_embeddings(table)
    assert ours.get_input_embeddings() is table and set(ours.state_dict()) == set(hf.state_dict())
    ids, mask = random_batch(ours.config.vocab_size, 2, 11, seed=3)
    kwargs = dict(input_ids=ids, attention_mask=mask)
    if class_name == "UMT5ForConditionalGeneration":
        kwargs["decoder_input_ids"] = ids[:, :4]
    with torch.no_grad():
        expected = hf(**kwargs)[0]
    assert_close(ours(**kwargs)[0], expected, 1e-5, class_name)


def test_a_model_that_generated_still_copies_and_pickles(seq2seq):
    path, _ = seq2seq
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend=BACKEND)
    ids = torch.tensor([[5, 6, 7, 1]])
    out = model.generate(ids, max_new_tokens=5)  # builds the LM head screen on the cpu backend
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone.generate(ids, max_new_tokens=5), out)


def test_inference_only_models_are_in_eval_mode_and_refuse_train_mode(seq2seq):
    path, hf = seq2seq
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend=BACKEND)
    assert not model.training and not any(m.training for m in model.modules())
    assert model.eval() is model and not umt5_fast.UMT5ForConditionalGeneration.from_hf(hf).training
    with pytest.raises(NotImplementedError, match="inference-only: train mode"):
        model.train()


def test_config_dtype_architectures_and_generation_config(seq2seq, tmp_path):
    path, hf = seq2seq
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, dtype=dtype)
        assert model.config.torch_dtype is dtype and model.config.dtype is dtype and model.dtype == dtype
    assert umt5_fast.UMT5Config(torch_dtype="bfloat16").torch_dtype is torch.bfloat16
    assert json.loads(model.config.to_json_string())["torch_dtype"] == "bfloat16"
    encoder = umt5_fast.UMT5EncoderModel.from_pretrained(path)
    encoder.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["UMT5EncoderModel"]
    assert encoder.generation_config is None and not encoder.can_generate()
    generating = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path)
    assert generating.can_generate() and generating.main_input_name == "input_ids"
    for name in ("decoder_start_token_id", "pad_token_id", "eos_token_id"):
        assert getattr(generating.generation_config, name) == getattr(hf.generation_config, name), name
    assert generating.name_or_path == str(path)


def test_parameter_counts_and_save_options_follow_transformers(seq2seq, tmp_path):
    path, hf = seq2seq
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path)
    for kwargs in (dict(), dict(exclude_embeddings=True)):
        assert model.num_parameters(**kwargs) == hf.num_parameters(**kwargs), kwargs
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(NotImplementedError, match="does not upload"):
        model.save_pretrained(tmp_path, push_to_hub=True)
    model.save_pretrained(tmp_path, is_main_process=False)
    assert not any(tmp_path.iterdir())
    again = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, config=hf.config)  # transformers' config
    assert again.config.d_model == hf.config.d_model
    config = umt5_fast.UMT5Config.from_pretrained(path)
    half = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, config=config, dtype=torch.bfloat16)
    full = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, config=config)
    assert half.config is not config and config.torch_dtype is not torch.bfloat16  # the caller's stays as it was
    assert (half.config.torch_dtype, full.config.torch_dtype) == (torch.bfloat16, torch.float32)
    assert umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, dense_act_fn="relu").config.dense_act_fn == "relu"


@pytest.mark.skipif("cpu" not in available_backends(), reason="the C++ extension is not built")
def test_jit_trace_of_the_cpu_backend_replays_correctly(seq2seq):
    """The C++ kernels write through raw pointers, which a trace cannot record: tracing runs the
    eager ops, so the traced module computes the same function."""
    path, _ = seq2seq
    model = umt5_fast.UMT5EncoderModel.from_pretrained(path, backend="cpu")
    ids, other = torch.randint(2, 100, (2, 9)), torch.randint(2, 100, (2, 9))
    with pytest.warns():  # torch's tracer warnings about Python-side checks
        traced = torch.jit.trace(lambda x: model(input_ids=x, return_dict=False)[0], (ids,), check_trace=False)
    assert_close(traced(other), model(input_ids=other).last_hidden_state, 1e-5, "traced")
    assert model.backend == "cpu"


@pytest.mark.parametrize("quantize", ["int8", "w8a8"])
def test_converting_a_quantized_model_keeps_its_scales(seq2seq, quantize):
    path, _ = seq2seq
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, quantize=quantize)
    scales = {name: b.clone() for name, b in model.named_buffers() if name.endswith("qscale")}
    model.to(torch.bfloat16)
    for name, buffer in model.named_buffers():
        if name.endswith("qscale"):
            assert buffer.dtype == torch.float32 and torch.equal(buffer, scales[name]), name


def test_set_output_embeddings_replaces_the_lm_head_as_in_transformers(checkpoint_factory):
    import transformers
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration")
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path)
    hf = transformers.UMT5ForConditionalGeneration.from_pretrained(path).eval()
    head = torch.nn.Linear(ours.config.d_model, ours.config.vocab_size, bias=False)
    torch.nn.init.normal_(head.weight, std=0.3)
    ours.set_output_embeddings(head)
    hf.set_output_embeddings(head)
    ids, dec = torch.tensor([[5, 6, 7, 1]]), torch.tensor([[0, 9, 10]])
    with torch.no_grad():
        ref = hf(input_ids=ids, decoder_input_ids=dec).logits
    torch.testing.assert_close(ours(input_ids=ids, decoder_input_ids=dec).logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.generate(ids, max_new_tokens=5), hf.generate(ids, max_new_tokens=5, use_cache=False))
    with pytest.raises(ValueError, match="set_output_embeddings"):
        ours.set_output_embeddings(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match="set_output_embeddings.*bfloat16"):
        ours.set_output_embeddings(head.to(torch.bfloat16))


def test_outputs_are_ordered_dicts_like_transformers(checkpoint_factory):
    """isinstance dict, item assignment, a field set after construction staying out of the keys,
    no key removal, pickling and deep copies: as transformers' ModelOutput."""
    import transformers
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration")
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path)
    hf = transformers.UMT5ForConditionalGeneration.from_pretrained(path).eval()
    ids, dec = torch.tensor([[5, 6, 7, 1]]), torch.tensor([[0, 9, 10]])
    with torch.no_grad():
        ref = hf(input_ids=ids, decoder_input_ids=dec)
    out = ours(input_ids=ids, decoder_input_ids=dec)
    for o in (out, ref):
        assert isinstance(o, dict) and list(o.keys()) == list(ref.keys())
        o.decoder_hidden_states = (o.logits,)  # None at construction: an attribute, not a key
        assert "decoder_hidden_states" not in o and len(o.to_tuple()) == len(ref.keys())
        o["logits"] = o.logits * 2  # item assignment updates the attribute too
        assert o.logits is o["logits"]
        with pytest.raises(Exception):
            del o["logits"]
    for copied, ref_copied in ((copy.deepcopy(out), copy.deepcopy(ref)),
                               (pickle.loads(pickle.dumps(out)), pickle.loads(pickle.dumps(ref)))):
        # (both rebuild from the fields: the attribute set above becomes a key of the copy)
        assert type(copied) is type(out) and list(copied.keys()) == list(ref_copied.keys())
        assert torch.equal(copied.logits, out.logits) and torch.equal(copied[0], out[0])
    logits, *_ = out  # unpacking iterates over the keys, as a dict does
    assert logits == "logits"


def test_transformers_encoder_outputs_are_read_by_field(checkpoint_factory):
    """A transformers BaseModelOutput with attentions but no hidden states: its tuple drops the None
    field, so reading it by position would file the attentions as hidden states."""
    import transformers
    from transformers.modeling_outputs import BaseModelOutput as HFBaseModelOutput
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration")
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path)
    hf = transformers.UMT5ForConditionalGeneration.from_pretrained(path).eval()
    ids, dec = torch.tensor([[5, 6, 7, 1]]), torch.tensor([[0, 9, 10]])
    with torch.no_grad():
        enc = hf.get_encoder()(input_ids=ids, output_attentions=True)
        given = HFBaseModelOutput(last_hidden_state=enc.last_hidden_state, attentions=enc.attentions)
        ref = hf(encoder_outputs=given, decoder_input_ids=dec)
    out = ours(encoder_outputs=given, decoder_input_ids=dec)
    assert list(out.keys()) == list(ref.keys()) and out.encoder_hidden_states is None
    assert all(torch.equal(a, b) for a, b in zip(out.encoder_attentions, ref.encoder_attentions))
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_the_stacks_take_transformers_arguments(seq2seq):
    """get_encoder() / get_decoder() called as transformers' stacks are: return_dict=False gives its
    tuples; the decoder keeps a cache by default (config.use_cache) whose K/V are transformers'; output
    flags default to the config's; use_cache=True on the encoder is an error, as in transformers."""
    path, hf = seq2seq
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend=BACKEND)
    ids, mask = random_batch(ours.config.vocab_size, 3, 13, seed=4)
    decoder_ids = torch.randint(2, ours.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs_encoded = hf.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=False)
        theirs = hf.get_decoder()(input_ids=decoder_ids, encoder_hidden_states=theirs_encoded[0],
                                  encoder_attention_mask=mask, return_dict=False)
    encoded = ours.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=False)
    assert isinstance(encoded, tuple) and len(encoded) == len(theirs_encoded)
    assert_close(encoded[0], theirs_encoded[0], 1e-5, "encoder")
    decoded = ours.get_decoder()(input_ids=decoder_ids, encoder_hidden_states=encoded[0],
                                 encoder_attention_mask=mask, return_dict=False)
    assert isinstance(decoded, tuple) and len(decoded) == len(theirs) == 2  # hidden states, cache
    assert_close(decoded[0], theirs[0], 1e-5, "decoder")
    ours_cache, their_cache = decoded[1].to_legacy_cache(), theirs[1].to_legacy_cache()
    for ours_layer, their_layer in zip(ours_cache, their_cache):
        for a, b in zip(ours_layer, their_layer):
            assert_close(a, b, 1e-5, "cache")
    out = ours.get_decoder()(input_ids=decoder_ids, encoder_hidden_states=encoded[0], encoder_attention_mask=mask,
                             use_cache=False, output_hidden_states=True)
    assert out.past_key_values is None and len(out.hidden_states) == ours.config.num_decoder_layers + 1
    with pytest.raises(ValueError, match="use_cache=True needs the decoder"):
        ours.get_encoder()(input_ids=ids, attention_mask=mask, use_cache=True)
