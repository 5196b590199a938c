import json

import pytest

from umt5_fast import UMT5Config


def test_reads_transformers_config_with_every_field(tmp_path):
    from transformers import UMT5Config as HFConfig
    hf = HFConfig(vocab_size=300, d_model=48, d_kv=20, d_ff=96, num_layers=3, num_decoder_layers=5, num_heads=7,
                  relative_attention_num_buckets=24, relative_attention_max_distance=64, layer_norm_epsilon=1e-5,
                  feed_forward_proj="gated-silu", tie_word_embeddings=False, pad_token_id=2, eos_token_id=[1, 3],
                  decoder_start_token_id=2, num_labels=4, classifier_dropout=0.2, custom_field="kept")
    hf.save_pretrained(tmp_path)
    ours = UMT5Config.from_pretrained(tmp_path)
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                  "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
                  "feed_forward_proj", "tie_word_embeddings", "pad_token_id", "eos_token_id",
                  "decoder_start_token_id", "num_labels", "classifier_dropout", "dense_act_fn", "is_gated_act"):
        assert getattr(ours, field) == getattr(hf, field), field
    assert ours.id2label == hf.id2label and ours.hidden_size == 48 and ours.num_attention_heads == 7
    ours.save_pretrained(tmp_path / "again")
    assert HFConfig.from_pretrained(tmp_path / "again").custom_field == "kept"
    assert UMT5Config.from_pretrained(tmp_path / "again") == ours


@pytest.mark.parametrize("proj,act,gated", [("relu", "relu", False), ("gelu", "gelu", False),
                                            ("gated-gelu", "gelu_new", True), ("gated-silu", "silu", True),
                                            ("gated-relu", "relu", True), ("silu", "silu", False)])
def test_feed_forward_proj_forms(proj, act, gated):
    from transformers import UMT5Config as HFConfig
    ours, hf = UMT5Config(feed_forward_proj=proj), HFConfig(feed_forward_proj=proj)
    assert (ours.dense_act_fn, ours.is_gated_act) == (hf.dense_act_fn, hf.is_gated_act) == (act, gated)


def test_explicit_dense_act_fn_and_is_gated_act_override_feed_forward_proj(tmp_path):
    """A config.json's own dense_act_fn / is_gated_act win over feed_forward_proj, as in
    transformers; overriding feed_forward_proj at load re-derives them."""
    from transformers import UMT5Config as HFConfig
    HFConfig(feed_forward_proj="gated-gelu").save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data.update(dense_act_fn="relu", is_gated_act=False)
    (tmp_path / "config.json").write_text(json.dumps(data))
    ours, hf = UMT5Config.from_pretrained(tmp_path), HFConfig.from_pretrained(tmp_path)
    assert (ours.dense_act_fn, ours.is_gated_act) == (hf.dense_act_fn, hf.is_gated_act) == ("relu", False)
    assert UMT5Config.from_pretrained(tmp_path, feed_forward_proj="gated-silu").dense_act_fn == "silu"
    assert UMT5Config.from_pretrained(tmp_path, dense_act_fn="mish").dense_act_fn == "mish"
    assert UMT5Config.from_dict(ours.to_dict()) == ours


@pytest.mark.parametrize("field,value,match", [
    ("num_heads", 0, "num_heads"), ("d_kv", -3, "d_kv"), ("vocab_size", 2.5, "vocab_size"),
    ("feed_forward_proj", "gated-gelu-x", "feed_forward_proj"), ("feed_forward_proj", "swiglu", "not supported"),
    ("feed_forward_proj", "fancy-gelu", "feed_forward_proj"), ("layer_norm_epsilon", 0, "layer_norm_epsilon"),
    ("relative_attention_num_buckets", 1, "relative_attention_num_buckets"),
    ("relative_attention_num_buckets", 3, "relative_attention_num_buckets must be >= 4"),  # no exact bucket
    ("relative_attention_max_distance", 0, "relative_attention_max_distance"),
    ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false"),
    ("scale_decoder_outputs", "false", "scale_decoder_outputs"), ("use_cache", "maybe", "use_cache"),
    ("is_encoder_decoder", 1, "is_encoder_decoder"), ("is_gated_act", "yes", "is_gated_act"),
    ("dense_act_fn", "prelu", "dense_act_fn='prelu'"), ("dense_act_fn", ["relu"], "dense_act_fn"),
    ("dropout_rate", "x", "dropout_rate"), ("output_hidden_states", "yes", "output_hidden_states"),
    ("pad_token_id", 10**9, "pad_token_id"), ("eos_token_id", -1, "eos_token_id"),
    ("problem_type", "ranking", "problem_type"), ("classifier_dropout", 3, "classifier_dropout")])
def test_bad_fields_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        UMT5Config(**{field: value})


def test_unequal_heads_times_dkv_is_legal():
    config = UMT5Config(d_model=40, num_heads=5, d_kv=24)
    assert config.num_heads * config.d_kv != config.d_model


def test_bad_config_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        UMT5Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        UMT5Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type"):
        UMT5Config.from_pretrained(tmp_path)


def test_attributes_beyond_the_fields_behave_as_transformers_configs(tmp_path):
    """Every key of a config.json reads as an attribute; attributes set at run time are saved;
    PretrainedConfig's other attributes read as its defaults; to_diff_dict keeps what differs from
    a default config, as transformers' (compared with transformers' own)."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.UMT5Config(vocab_size=500, d_model=32, num_heads=3, my_key=3,
                                     task_specific_params={"translation": {"prefix": "en: "}})
    theirs.save_pretrained(tmp_path / "saved")
    ours = UMT5Config.from_pretrained(tmp_path / "saved")
    assert ours.my_key == 3 and ours.task_specific_params == {"translation": {"prefix": "en: "}}
    for name in ("max_length", "sep_token_id", "tie_encoder_decoder", "pruned_heads", "chunk_size_feed_forward"):
        assert getattr(ours, name) == getattr(transformers.UMT5Config(), name), name
    with pytest.raises(AttributeError, match="no attribute 'no_such_attribute'"):
        ours.no_such_attribute  # noqa: B018
    ours.my_field, ours.hidden_size, ours._name_or_path, ours._commit_hash = 7, 48, "somewhere", "abc"
    assert ours.d_model == 48 and ours.name_or_path == "somewhere"
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["my_field"] == 7 and saved["my_key"] == 3 and saved["d_model"] == 48
    assert ours._commit_hash == "abc" and "_commit_hash" not in saved  # (a tool's bookkeeping)
    reloaded = transformers.UMT5Config.from_pretrained(tmp_path / "ours")
    assert reloaded.my_field == 7 and reloaded.hidden_size == 48
    diff = ours.to_diff_dict()
    assert {"my_field", "my_key", "d_model", "vocab_size", "num_heads", "model_type"} <= set(diff)
    assert "relative_attention_num_buckets" not in diff and "layer_norm_epsilon" not in diff
    assert set(diff) - {"dense_act_fn", "is_gated_act", "scale_decoder_outputs", "torch_dtype"} <= \
        set(theirs.to_diff_dict()) | {"my_field", "d_model"}
