"""The eager ops' own paths that no kernel test covers."""
import pytest
import torch

from umt5_fast.ops import eager


@pytest.mark.parametrize("length", [1, 7, 20])
@pytest.mark.parametrize("padded,with_bias", [(False, True), (True, True), (True, False)])
def test_decode_attention_with_a_device_side_length_equals_the_int_path(length, padded, with_bias):
    """A 0-d tensor length (what a CUDA graph replays) scores the whole buffer without a host sync;
    the cache past ``length`` is garbage here, which must get no weight."""
    g = torch.Generator().manual_seed(length)
    q = torch.randn(3, 5, 1, 24, generator=g)
    k, v = torch.randn(3, 5, 20, 24, generator=g), torch.randn(3, 5, 20, 24, generator=g)
    k[:, :, length:], v[:, :, length:] = 1e4, -1e4
    table = torch.randn(32, 5, generator=g) if with_bias else None
    mask = torch.ones(3, 20, dtype=torch.bool)
    if padded:
        mask[1, :3] = False  # row 1 at length 1 has no visible key: uniform over the written ones
    kwargs = dict(num_buckets=32, max_distance=40, key_padding_mask=mask if padded else None)
    expected = eager.decode_attention(q, k, v, length, table, **kwargs)
    got = eager.decode_attention(q, k, v, torch.tensor(length), table, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
