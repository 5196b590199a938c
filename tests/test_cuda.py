"""GPU-only checks (skipped without CUDA): the Triton backend in bf16, and CUDA-graph decoding."""
import pytest
import torch

import umt5_fast
from helpers import assert_close, random_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    return checkpoint_factory("UMT5ForConditionalGeneration", num_heads=4, d_kv=32, d_model=64, d_ff=96)


@pytest.mark.parametrize("backend", ["eager", "triton"])  # eager separates the graph logic from the kernels
def test_cuda_graph_generation_equals_eager_steps_and_transformers(checkpoint, backend):
    path, hf = checkpoint
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, device="cuda", backend=backend)
    ids, mask = random_batch(model.config.vocab_size, 3, 40, seed=0)
    ids, mask = ids.cuda(), mask.cuda()
    for kwargs in (dict(max_new_tokens=12), dict(max_new_tokens=10, num_beams=3)):
        with torch.no_grad():
            expected = hf.generate(ids.cpu(), attention_mask=mask.cpu(), use_cache=False, **kwargs)
        graphed = model.generate(ids, attention_mask=mask, use_cuda_graph=True, **kwargs)
        again = model.generate(ids, attention_mask=mask, use_cuda_graph=True, **kwargs)  # replays the graph
        plain = model.generate(ids, attention_mask=mask, use_cuda_graph=False, **kwargs)
        assert torch.equal(graphed, plain) and torch.equal(graphed, again)
        assert torch.equal(graphed.cpu(), expected)
    assert len(model._graphed_steps) == 2  # one per shape, reused by the second call


def test_triton_bf16_model_is_close_to_fp32(checkpoint):
    path, _ = checkpoint
    fp32 = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, device="cuda", backend="eager")
    bf16 = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(path, device="cuda", backend="triton",
                                                                  dtype=torch.bfloat16)
    ids, mask = random_batch(fp32.config.vocab_size, 3, 70, seed=1)
    dec, _ = random_batch(fp32.config.vocab_size, 3, 11, seed=2, padding=(None,))
    ids, mask, dec = ids.cuda(), mask.cuda(), dec.cuda()
    expected = fp32(ids, attention_mask=mask, decoder_input_ids=dec).logits
    got = bf16(ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert_close(got.float(), expected, 1e-1, "bf16 triton vs fp32")
