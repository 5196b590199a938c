"""StaticCache bookkeeping against plain tensors: beam reorders move only the positions written
so far, and what a step reads back ([:, :, :length]) is the reference's, through buffer growth,
reorders with repeated rows, and the fixed buffers a CUDA graph keeps."""
import pytest
import torch

from umt5_fast.cache import StaticCache

LAYERS, HEADS, D_KV = 3, 2, 5


@pytest.mark.parametrize("fixed_buffers", [False, True])
def test_reorder_and_growth_match_plain_tensors(fixed_buffers):
    gen = torch.Generator().manual_seed(0)
    rows, max_length = 6, 11
    cache = StaticCache(LAYERS, rows, HEADS, max_length, D_KV, torch.float32, "cpu",
                        fixed_buffers=fixed_buffers, initial_length=2)
    reference = [(torch.empty(rows, HEADS, 0, D_KV), torch.empty(rows, HEADS, 0, D_KV)) for _ in range(LAYERS)]
    storage = cache.keys.data_ptr()
    for step, width in enumerate([3, 1, 1, 2, 1, 1, 1]):  # a prompt, then steps (one of 2 positions)
        start = cache.length
        for layer in range(LAYERS):
            k, v = (torch.randn(rows, HEADS, width, D_KV, generator=gen) for _ in range(2))
            got_k, got_v = cache.update(layer, k, v, start)
            reference[layer] = (torch.cat([reference[layer][0], k], 2), torch.cat([reference[layer][1], v], 2))
            assert torch.equal(got_k, reference[layer][0]) and torch.equal(got_v, reference[layer][1])
        cache.length += width
        # beams move within groups of 3 rows, with repeats (one beam spawning two)
        index = torch.tensor([[0, 0, 2, 5, 3, 3], [1, 2, 0, 4, 4, 4], [2, 1, 0, 3, 5, 4], [0, 1, 2, 3, 4, 5]][step % 4])
        cache.reorder(index)
        reference = [(k[index], v[index]) for k, v in reference]
        for layer in range(LAYERS):
            keys, values = cache.layer_buffers(layer)
            assert torch.equal(keys[:, :, :cache.length], reference[layer][0])
            assert torch.equal(values[:, :, :cache.length], reference[layer][1])
    if fixed_buffers:  # a captured graph keeps reading this memory
        assert cache.keys.data_ptr() == storage

