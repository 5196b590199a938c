"""The benchmark suite's transformers engines (benchmarks/engines.py): the fp32 reference and its
bf16 / fp16 peers load the same checkpoint in their dtype and give transformers' own outputs; the
umt5_fast half-precision models load in theirs."""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
engines = pytest.importorskip("benchmarks.engines")

from helpers import random_batch  # noqa: E402


@pytest.mark.parametrize("name,dtype", [("transformers-fp32", torch.float32), ("transformers-bf16", torch.bfloat16),
                                        ("transformers-fp16", torch.float16)])
def test_transformers_engines_run_transformers_in_their_dtype(checkpoint_factory, name, dtype):
    # as many decoder layers as encoder ones: transformers' generate fails with its cache otherwise
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration", num_layers=2, num_decoder_layers=2)
    engine = engines.engine_by_name(name)
    assert engine.family == "transformers" and engine.missing is None
    engine.load(path, None, "encoder", threads=1)
    assert next(engine.model.parameters()).dtype == dtype
    ids, mask = random_batch(engine.model.config.vocab_size, 2, 13, seed=3)
    got = engine.encode(ids, mask)
    reference = transformers.UMT5EncoderModel.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state.float().numpy()
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    engine.load(path, None, "generate", threads=1)
    new = engine.generate(ids, mask, new_tokens=5, num_beams=1)
    assert new.shape == (2, 5)


@pytest.mark.parametrize("name,dtype", [("umt5_fast-cpu-bf16-model", torch.bfloat16),
                                        ("umt5_fast-cpu-fp16-model", torch.float16)])
def test_umt5_fast_half_precision_models_load_in_their_dtype(checkpoint_factory, name, dtype):
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration")
    engine = engines.engine_by_name(name)
    if engine.missing:
        pytest.skip(engine.missing)
    assert engine.activation_bytes == engine.weight_bytes == 2
    engine.load(path, None, "encoder", threads=1)
    assert engine.model.dtype == dtype
    ids, mask = random_batch(engine.model.config.vocab_size, 2, 13, seed=3)
    assert engine.encode(ids, mask).dtype == np.float32


def test_sampled_workloads_draw_the_same_ids_in_umt5_fast_and_transformers(checkpoint_factory):
    """A sampled workload (top-k 50 from the suite's seed) gives transformers' ids in umt5_fast, call
    after call, and they are not greedy decoding's; the workloads are their own group."""
    workloads = pytest.importorskip("benchmarks.workloads")
    sampled = [w for w in workloads.catalog(64, 32) if w.group == "sample"]
    assert [w.name for w in sampled] == ["sample-top50-b1", "sample-top50-b16"] and all(w.top_k == 50 for w in sampled)
    assert workloads.select(workloads.catalog(64, 32), ["sample"]) == sampled
    path, _ = checkpoint_factory("UMT5ForConditionalGeneration", num_layers=2, num_decoder_layers=2)
    ours, theirs = engines.engine_by_name("umt5_fast-cpu-fp32"), engines.engine_by_name("transformers-fp32")
    if ours.missing:
        pytest.skip(ours.missing)
    for engine in (ours, theirs):
        engine.load(path, None, "generate", threads=1)
    ids, mask = random_batch(theirs.model.config.vocab_size, 3, 11, seed=5)
    expected = theirs.generate(ids, mask, new_tokens=6, num_beams=1, top_k=50)
    assert expected.shape == (3, 6)
    for _ in range(2):
        assert np.array_equal(ours.generate(ids, mask, new_tokens=6, num_beams=1, top_k=50), expected)
    assert not np.array_equal(ours.generate(ids, mask, new_tokens=6, num_beams=1), expected)
