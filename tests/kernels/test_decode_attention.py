"""kernels.decode_attention against the eager reference (umt5_fast.ops.eager.decode_attention)."""
import pytest
import torch

from umt5_fast.kernels.decode_attention import decode_attention, default_num_splits
from umt5_fast.ops import eager

MAX_LENGTH = 80
# (dtype, atol, rtol); half precision is compared with the eager op run in fp32 on the same inputs.
DTYPES = [(torch.float32, 2e-5, 1e-4), (torch.float16, 1e-2, 1e-2)]


def make_step(batch, heads, head_dim, cache_length, dtype, device):
    """q [B, H, 1, D] (a transposed view, as the model passes it) and caches whose rows past
    cache_length hold NaN, so reading past the visible keys fails the test."""
    q = torch.randn(batch, 1, heads, head_dim, device=device).to(dtype).transpose(1, 2)
    k_cache, v_cache = (torch.randn(batch, heads, MAX_LENGTH, head_dim, device=device).to(dtype) for _ in range(2))
    k_cache[:, :, cache_length:] = float("nan")
    v_cache[:, :, cache_length:] = float("nan")
    return q, k_cache, v_cache


def reference(q, k_cache, v_cache, cache_length, table, **kwargs):
    upcast = [t if t is None else t.float() for t in (q, k_cache, v_cache, table)]
    return eager.decode_attention(*upcast[:3], cache_length, upcast[3], **kwargs).to(q.dtype)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("cache_length, heads, head_dim", [(1, 3, 16), (37, 5, 24), (70, 3, 80), (80, 2, 64)])
def test_decode_attention(cache_length, heads, head_dim, num_splits, dtype, atol, rtol, device, nan_filled):
    q, k_cache, v_cache = make_step(2, heads, head_dim, cache_length, dtype, device)
    table = torch.randn(8, heads, device=device).to(dtype)
    mask = torch.ones(2, MAX_LENGTH, dtype=torch.bool, device=device)
    mask[0, :min(3, cache_length - 1)] = False  # left padding of the decoder prompt
    expected = reference(q, k_cache, v_cache, cache_length, table, num_buckets=8, max_distance=16,
                         key_padding_mask=mask)
    for length in (cache_length, torch.tensor(cache_length, device=device)):
        out = nan_filled((2, 1, heads, head_dim), dtype)
        decode_attention(q, k_cache, v_cache, length, table, num_buckets=8, max_distance=16,
                         key_padding_mask=mask, num_splits=num_splits, out=out)
        torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_no_bias_and_every_key_masked(num_splits, device):
    q, k_cache, v_cache = make_step(2, 3, 24, 50, torch.float32, device)
    mask = torch.ones(2, MAX_LENGTH, dtype=torch.bool, device=device)
    mask[1, :50] = False  # the reference averages all 50 visible values of this row
    out = decode_attention(q, k_cache, v_cache, 50, None, num_buckets=32, max_distance=128,
                           key_padding_mask=mask, num_splits=num_splits)
    expected = reference(q, k_cache, v_cache, 50, None, num_buckets=32, max_distance=128, key_padding_mask=mask)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[1, 0], v_cache[1, :, :50].mean(dim=1))


def test_matches_causal_attention_of_the_last_row(device):
    """The contract: decode equals attention(..., causal=True, query_offset=L - 1) on the first L keys."""
    q, k_cache, v_cache = make_step(1, 4, 32, 60, torch.float32, device)
    table = torch.randn(32, 4, device=device)
    out = decode_attention(q, k_cache, v_cache, 60, table, num_buckets=32, max_distance=128)
    expected = eager.attention(q, k_cache[:, :, :60], v_cache[:, :, :60], table, bidirectional=False,
                               num_buckets=32, max_distance=128, causal=True, query_offset=59)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_default_num_splits_is_a_power_of_two_within_the_cache(device):
    for batch_heads, max_length in [(1, 4096), (64, 512), (1024, 8192), (3, 100)]:
        splits = default_num_splits(batch_heads, max_length, torch.device(device))
        assert splits >= 1 and splits & (splits - 1) == 0
        assert splits <= max(1, max_length // 256)


@pytest.mark.cuda_only
@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_bfloat16_long_cache(num_splits, device):
    heads, length = 8, 1000
    q = torch.randn(2, heads, 1, 64, device=device, dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(2, heads, 1024, 64, device=device, dtype=torch.bfloat16) for _ in range(2))
    table = torch.randn(32, heads, device=device, dtype=torch.bfloat16)
    out = decode_attention(q, k_cache, v_cache, torch.tensor(length, device=device), table, num_buckets=32,
                           max_distance=128, num_splits=num_splits)
    expected = reference(q, k_cache, v_cache, length, table, num_buckets=32, max_distance=128)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


def test_triton_backend(device):
    from umt5_fast.ops import triton as triton_ops
    q, k_cache, v_cache = make_step(2, 3, 32, 45, torch.float32, device)
    table = torch.randn(32, 3, device=device)
    # eager gets the python int: its device-length path reads the NaN rows past the length.
    torch.testing.assert_close(
        triton_ops.decode_attention(q, k_cache, v_cache, torch.tensor(45, device=device), table, num_buckets=32,
                                    max_distance=128),
        eager.decode_attention(q, k_cache, v_cache, 45, table, num_buckets=32, max_distance=128),
        atol=2e-5, rtol=1e-4)
