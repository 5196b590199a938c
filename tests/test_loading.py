"""Checkpoint formats, key checks, saving and conversion."""
import json

import pytest
import torch

import umt5_fast
from umt5_fast.loading import CheckpointError
from helpers import assert_close, random_batch

TOL = 1e-5


def reference_logits(hf, ids, mask, dec):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits


@pytest.fixture
def seq2seq(checkpoint_factory):
    return checkpoint_factory("UMT5ForConditionalGeneration")


def batch(vocab):
    ids, mask = random_batch(vocab, 2, 21, 0)
    dec, _ = random_batch(vocab, 2, 7, 1, padding=(None,))
    return ids, mask, dec


@pytest.mark.parametrize("layout", ["sharded", "bin", "sharded-bin"])
def test_other_checkpoint_layouts_load(seq2seq, tmp_path, layout):
    _, hf = seq2seq
    kwargs = {"sharded": dict(max_shard_size="20KB"), "bin": dict(safe_serialization=False),
              "sharded-bin": dict(safe_serialization=False, max_shard_size="20KB")}[layout]
    hf.save_pretrained(tmp_path, **kwargs)
    names = {p.name for p in tmp_path.iterdir()}
    expected = {"sharded": "model.safetensors.index.json", "bin": "pytorch_model.bin",
                "sharded-bin": "pytorch_model.bin.index.json"}[layout]
    assert expected in names
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path, backend="eager")
    ids, mask, dec = batch(ours.config.vocab_size)
    assert_close(ours(ids, attention_mask=mask, decoder_input_ids=dec).logits,
                 reference_logits(hf, ids, mask, dec), TOL, "logits")


def _mapped_file(address: int) -> str:
    """The file backing ``address`` in this process's memory map ('' for anonymous memory)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 else ""
    return ""


def test_weights_are_memory_mapped_not_copied(seq2seq):
    path, _ = seq2seq
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="eager")
    for weight in (ours.encoder.block[0].layer[0].SelfAttention.q.weight, ours.lm_head.weight):
        assert _mapped_file(weight.data_ptr()).endswith("model.safetensors")
    converted = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="eager", dtype=torch.bfloat16)
    assert not _mapped_file(converted.lm_head.weight.data_ptr()).endswith("model.safetensors")


def test_save_pretrained_round_trips_through_transformers(seq2seq, tmp_path):
    path, hf = seq2seq
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="eager")
    ours.save_pretrained(tmp_path / "ours")
    import transformers
    back = transformers.UMT5ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    ids, mask, dec = batch(ours.config.vocab_size)
    assert torch.equal(reference_logits(back, ids, mask, dec), reference_logits(hf, ids, mask, dec))
    ours.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    again = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path / "sharded", backend="eager")
    assert torch.equal(again(ids, attention_mask=mask, decoder_input_ids=dec).logits,
                       ours(ids, attention_mask=mask, decoder_input_ids=dec).logits)


def test_tied_checkpoint_shares_embedding_and_rescales(checkpoint_factory):
    path, hf = checkpoint_factory("UMT5ForConditionalGeneration", tie_word_embeddings=True)
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="eager")
    assert ours.lm_head.weight is ours.shared.weight and ours.config.scale_decoder_outputs
    ids, mask, dec = batch(ours.config.vocab_size)
    assert_close(ours(ids, attention_mask=mask, decoder_input_ids=dec).logits,
                 reference_logits(hf, ids, mask, dec), TOL, "tied logits")


def test_from_hf_converts_a_live_model(seq2seq):
    _, hf = seq2seq
    ours = umt5_fast.UMT5ForConditionalGeneration.from_hf(hf, backend="eager")
    ids, mask, dec = batch(ours.config.vocab_size)
    assert_close(ours(ids, attention_mask=mask, decoder_input_ids=dec).logits,
                 reference_logits(hf, ids, mask, dec), TOL, "from_hf logits")


def _rewrite(path, tmp_path, edit):
    from safetensors.torch import load_file, save_file
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    out = tmp_path / "edited"
    out.mkdir()
    (out / "config.json").write_text((path / "config.json").read_text())
    save_file(state, str(out / "model.safetensors"))
    return out


def test_missing_keys_are_listed(seq2seq, tmp_path):
    path, _ = seq2seq
    out = _rewrite(path, tmp_path, lambda s: (s.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight"),
                                              s.pop("lm_head.weight")))
    with pytest.raises(CheckpointError, match=r"missing tensors.*encoder\.block\.1\.layer\.1\.DenseReluDense\.wo"
                                              r"\.weight.*lm_head"):
        umt5_fast.UMT5ForConditionalGeneration.from_pretrained(out)


def test_unexpected_and_misshaped_keys_are_listed(seq2seq, tmp_path):
    path, _ = seq2seq

    def edit(state):
        state["encoder.block.7.layer.0.SelfAttention.q.weight"] = torch.zeros(3, 3)
        state["decoder.final_layer_norm.weight"] = torch.zeros(41)

    out = _rewrite(path, tmp_path, edit)
    with pytest.raises(CheckpointError) as info:
        umt5_fast.UMT5ForConditionalGeneration.from_pretrained(out)
    message = str(info.value)
    assert "encoder.block.7.layer.0.SelfAttention.q.weight" in message and "unexpected" in message
    assert "decoder.final_layer_norm.weight" in message and "(41,)" in message


@pytest.mark.parametrize("damage", ["truncate", "garbage-header", "empty"])
def test_corrupt_safetensors_raise_clear_errors(seq2seq, tmp_path, damage):
    path, _ = seq2seq
    data = (path / "model.safetensors").read_bytes()
    out = tmp_path / damage
    out.mkdir()
    (out / "config.json").write_text((path / "config.json").read_text())
    broken = {"truncate": data[: len(data) // 2], "garbage-header": data[:8] + b"{not json" + data[17:],
              "empty": b""}[damage]
    (out / "model.safetensors").write_bytes(broken)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        umt5_fast.UMT5ForConditionalGeneration.from_pretrained(out)


def _with_header(data: bytes, edit) -> bytes:
    import struct
    (length,) = struct.unpack("<Q", data[:8])
    header = edit(json.loads(data[8:8 + length]))
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + length:]


@pytest.mark.parametrize("damage", ["overlap", "float-shape", "string-metadata"])
def test_inconsistent_safetensors_headers_are_refused(seq2seq, tmp_path, damage):
    """What the safetensors library itself refuses: tensors sharing bytes, non-integer shapes, bad metadata."""
    path, _ = seq2seq
    q, k = "encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.0.layer.0.SelfAttention.k.weight"

    def edit(header):
        if damage == "overlap":
            header[q]["data_offsets"] = header[k]["data_offsets"]
        elif damage == "float-shape":
            header[q]["shape"] = [header[q]["shape"][0] + 0.5, header[q]["shape"][1]]
        else:
            header["__metadata__"] = "pt"
        return header
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(_with_header((path / "model.safetensors").read_bytes(), edit))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path)


def test_saving_over_an_earlier_save_leaves_no_stale_weights(seq2seq, tmp_path):
    path, _ = seq2seq
    first = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="eager")
    first.save_pretrained(tmp_path)
    second = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, backend="eager", layer_norm_epsilon=0.5)
    second.save_pretrained(tmp_path, max_shard_size="30KB")
    assert not (tmp_path / "model.safetensors").exists()
    first.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("model-*")) and not (tmp_path / "model.safetensors.index.json").exists()
    for bad in (0, -1, "0MB", "big"):
        with pytest.raises(ValueError, match="max_shard_size"):
            first.save_pretrained(tmp_path / "x", max_shard_size=bad)


def test_missing_files_raise_file_not_found(seq2seq, tmp_path):
    path, _ = seq2seq
    with pytest.raises(FileNotFoundError, match="config.json"):
        umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path / "nope")


def test_head_checkpoint_loads_into_base_model_and_vice_versa_checks(checkpoint_factory):
    path, hf = checkpoint_factory("UMT5ForSequenceClassification", num_labels=3)
    base = umt5_fast.UMT5Model.from_pretrained(path, backend="eager")  # strips the transformer. prefix
    ids, mask = random_batch(base.config.vocab_size, 2, 15, 2)
    dec = base._shift_right(ids)
    with torch.no_grad():
        ref = hf.transformer(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).last_hidden_state
    assert_close(base(ids, attention_mask=mask, decoder_input_ids=dec).last_hidden_state, ref, TOL, "base")
    seq_path, _ = checkpoint_factory("UMT5ForConditionalGeneration")
    with pytest.raises(CheckpointError, match="classification_head"):
        umt5_fast.UMT5ForSequenceClassification.from_pretrained(seq_path)


def test_generation_config_is_read(seq2seq, tmp_path):
    path, hf = seq2seq
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7, "num_beams": 2}))
    ours = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path)
    assert ours.generation_config["num_beams"] == 2


def test_from_pretrained_keyword_arguments(checkpoint_factory, tmp_path):
    """Config fields override, transformers' local no-op options pass, anything else is a TypeError
    (a typo must not load a silently different model); subfolder= picks a pipeline's component."""
    path, _ = checkpoint_factory("UMT5EncoderModel")
    other, _ = checkpoint_factory("UMT5EncoderModel", d_model=48, d_kv=12)
    with pytest.raises(TypeError, match="torch_dtpye"):
        umt5_fast.UMT5EncoderModel.from_pretrained(path, torch_dtpye=torch.bfloat16)
    model = umt5_fast.UMT5EncoderModel.from_pretrained(path, low_cpu_mem_usage=True, local_files_only=True,
                                                       layer_norm_epsilon=1e-3)
    assert model.config.layer_norm_epsilon == 1e-3
    import shutil
    shutil.copytree(other, tmp_path / "pipe" / "text_encoder")
    shutil.copytree(path, tmp_path / "pipe", dirs_exist_ok=True)
    assert umt5_fast.UMT5EncoderModel.from_pretrained(tmp_path / "pipe").config.d_model != 48
    assert umt5_fast.UMT5EncoderModel.from_pretrained(tmp_path / "pipe", subfolder="text_encoder").config.d_model == 48


def test_integer_weights_are_refused(seq2seq, tmp_path):
    from safetensors.torch import load_file, save_file
    path, _ = seq2seq
    state = load_file(str(path / "model.safetensors"))
    name = "encoder.block.0.layer.0.SelfAttention.q.weight"
    state[name] = state[name].long()
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match=rf"{name} has dtype torch.int64"):
        umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path)


@pytest.mark.parametrize("index", ['{"weight_map": []}', '{"weight_map": {"shared.weight": 3}}', "[]"])
def test_malformed_shard_index(seq2seq, tmp_path, index):
    path, hf = seq2seq
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json is corrupt"):
        umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path)


def test_save_pretrained_records_the_dtype(seq2seq, tmp_path):
    path, _ = seq2seq
    umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16


@pytest.mark.parametrize("quantize", ["int8", "bf16"])
def test_tied_model_quantised_at_load_saves_as_it_runs(checkpoint_factory, tmp_path, quantize):
    """quantize unties a tied LM head; the saved files hold that head (rescale folded in), untied."""
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration", tie_word_embeddings=True)
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, quantize=quantize, backend="eager")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    ids, mask, dec = batch(model.config.vocab_size)
    import transformers
    for back in (umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path, backend="eager"),
                 transformers.UMT5ForConditionalGeneration.from_pretrained(tmp_path).eval()):
        with torch.no_grad():
            assert_close(back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                         model(ids, attention_mask=mask, decoder_input_ids=dec).logits, TOL, "logits")


def test_use_safetensors_picks_the_weight_files(checkpoint_factory, tmp_path):
    """transformers' use_safetensors: False reads pytorch_model.bin even beside model.safetensors,
    True only safetensors files; each missing form is named."""
    import shutil
    path, _ = checkpoint_factory("UMT5EncoderModel")
    _, other = checkpoint_factory("UMT5EncoderModel", seed=1)
    shutil.copytree(path, tmp_path / "both")
    other.save_pretrained(tmp_path / "other", safe_serialization=False)
    shutil.copy(tmp_path / "other" / "pytorch_model.bin", tmp_path / "both")
    load = umt5_fast.UMT5EncoderModel.from_pretrained
    ids = torch.randint(2, 100, (1, 9))
    with torch.no_grad():
        expected_bin = other(input_ids=ids).last_hidden_state
    assert_close(load(tmp_path / "both", use_safetensors=False)(ids).last_hidden_state, expected_bin, TOL, "bin")
    assert not torch.allclose(load(tmp_path / "both")(ids).last_hidden_state, expected_bin)
    with pytest.raises(FileNotFoundError, match="use_safetensors=False"):
        load(path, use_safetensors=False)
    with pytest.raises(FileNotFoundError, match="use_safetensors=True"):
        load(tmp_path / "other", use_safetensors=True)
    with pytest.raises(ValueError, match="use_safetensors"):
        load(path, use_safetensors="no")


def test_conflicting_dtype_arguments_are_refused(checkpoint_factory):
    path, _ = checkpoint_factory("UMT5EncoderModel")
    with pytest.raises(ValueError, match="disagree"):
        umt5_fast.UMT5EncoderModel.from_pretrained(path, dtype=torch.float16, torch_dtype=torch.bfloat16)
    model = umt5_fast.UMT5EncoderModel.from_pretrained(path, dtype=torch.float16, torch_dtype=torch.float16)
    assert model.shared.weight.dtype == torch.float16


@pytest.mark.parametrize("text,match", [("{oops", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_corrupt_generation_config_is_named(seq2seq, tmp_path, text, match):
    path, hf = seq2seq
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(ValueError, match=f"generation_config.json .*{match}"):
        umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path)


def test_triton_backend_off_cuda_is_refused_unless_interpreted(checkpoint_factory, monkeypatch):
    """Every op would quietly fall back to eager otherwise."""
    pytest.importorskip("triton")
    path, _ = checkpoint_factory("UMT5EncoderModel")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' runs its kernels on CUDA tensors"):
        umt5_fast.UMT5EncoderModel.from_pretrained(path, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert umt5_fast.UMT5EncoderModel.from_pretrained(path, backend="triton").backend == "triton"


def test_a_t5_directory_is_named_as_such(tmp_path):
    import transformers
    transformers.MT5ForConditionalGeneration(transformers.MT5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="this is a T5 / mT5 checkpoint"):
        umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path)


def test_transformers_loading_and_saving_arguments(seq2seq, tmp_path):
    """device_map to one device, variant files (transformers' names, both ways), a config path,
    output_loading_info, generation options (they reach the generation config, as in transformers),
    hub options that change nothing; save_pretrained's state_dict (tied tensors once), variant and
    hub options; a device map across devices is refused."""
    import transformers
    path, hf = seq2seq
    ids, mask, dec = batch(hf.config.vocab_size)
    expected = reference_logits(hf, ids, mask, dec)
    hf.save_pretrained(tmp_path / "variant", variant="v2")
    assert (tmp_path / "variant" / "model.v2.safetensors").is_file()
    for kwargs in (dict(device_map="cpu"), dict(device_map={"": "cpu"}), dict(device_map="auto"),
                   dict(config=str(path), force_download=False, proxies=None, ignore_mismatched_sizes=False)):
        model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, **kwargs)
        assert model.device == torch.device("cpu")
        assert_close(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, expected, 1e-5, kwargs)
    model, info = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path / "variant", variant="v2",
                                                                         output_loading_info=True)
    assert info == dict(missing_keys=[], unexpected_keys=[], mismatched_keys=[], error_msgs=[])
    assert_close(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, expected, 1e-5, "variant")
    with pytest.raises(FileNotFoundError, match="model.v3.safetensors"):
        umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path / "variant", variant="v3")
    with pytest.raises(TypeError, match="variant must be a string"):
        umt5_fast.UMT5ForConditionalGeneration.from_pretrained(tmp_path / "variant", variant=2)
    with pytest.raises(ValueError, match="several devices"):
        umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, device_map={"encoder": "cpu", "decoder": "cpu"})
    generating = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, num_beams=2, max_length=5)
    theirs = transformers.UMT5ForConditionalGeneration.from_pretrained(path, num_beams=2, max_length=5)
    assert generating.generation_config.num_beams == theirs.generation_config.num_beams == 2
    with torch.no_grad():
        use_cache = theirs.config.num_decoder_layers <= theirs.config.num_layers  # (transformers' cache fails else)
        assert torch.equal(generating.generate(ids, attention_mask=mask),
                           theirs.generate(ids, attention_mask=mask, use_cache=use_cache))
    # save: a state_dict as model.state_dict() lists it (tied tensors under each name: written once,
    # under the names transformers writes), a variant
    from safetensors import safe_open
    model.save_pretrained(tmp_path / "saved", state_dict=model.state_dict(), variant="v2", token=None,
                          save_peft_format=True)
    hf.save_pretrained(tmp_path / "theirs")
    with safe_open(tmp_path / "saved" / "model.v2.safetensors", "pt") as ours_file, \
            safe_open(tmp_path / "theirs" / "model.safetensors", "pt") as their_file:
        assert set(ours_file.keys()) == set(their_file.keys())
    reloaded = transformers.UMT5ForConditionalGeneration.from_pretrained(tmp_path / "saved", variant="v2")
    assert_close(reference_logits(reloaded, ids, mask, dec), expected, 1e-6, "saved state_dict")
    halved = {name: tensor * 0.5 for name, tensor in model.state_dict().items()}  # (ties broken: each written)
    model.save_pretrained(tmp_path / "halved", state_dict=halved)
    with safe_open(tmp_path / "halved" / "model.safetensors", "pt") as halved_file:
        assert set(halved_file.keys()) == set(halved)
        assert torch.equal(halved_file.get_tensor("encoder.block.0.layer.0.SelfAttention.q.weight"),
                           halved["encoder.block.0.layer.0.SelfAttention.q.weight"])
    quantized = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, quantize="int8")
    with pytest.raises(ValueError, match="packed weights"):
        quantized.save_pretrained(tmp_path / "quantized", state_dict=quantized.state_dict())
    # device_map and device: the same device in either spelling; disagreeing or malformed ones refused
    from umt5_fast.loading import device_of_map
    assert device_of_map(None, None) == "cpu" and device_of_map("cpu", torch.device("cpu")) == torch.device("cpu")
    assert device_of_map({"": 0}, "cuda") == torch.device("cuda:0")
    for device_map, device in ((True, None), ("cuda", "cpu"), ("cuda:1", "cuda")):
        with pytest.raises(ValueError):
            device_of_map(device_map, device)
