"""kernels.attention against the eager reference (umt5_fast.ops.eager.attention)."""
import pytest
import torch

from umt5_fast.kernels.attention import attention, bias_by_distance
from umt5_fast.ops import eager

# (dtype, atol, rtol). Half-precision results are compared with the eager op run in fp32 on the
# same (rounded) inputs: eager in fp16 rounds each score to fp16, an error of |score| * 2**-11
# that the kernel, scoring in fp32, does not make.
DTYPES = [(torch.float32, 2e-5, 1e-4), (torch.float16, 1e-2, 1e-2)]


def make_qkv(batch, heads, query_length, key_length, head_dim, dtype, device):
    """q, k, v as the model passes them: [B, H, L, D] views of [B, L, H, D] projections."""
    def project(length):
        return torch.randn(batch, length, heads, head_dim, device=device).to(dtype).transpose(1, 2)
    return project(query_length), project(key_length), project(key_length)


def padding_mask(key_length, device, *, left, right):
    """[2, Lk] bool: row 0 has `left` padded keys at the start, row 1 `right` at the end."""
    mask = torch.ones(2, key_length, dtype=torch.bool, device=device)
    mask[0, :left] = False
    mask[1, key_length - right:] = False
    return mask


def check(q, k, v, table, nan_filled, atol, rtol, **kwargs):
    batch, heads, query_length, head_dim = q.shape
    expected = eager.attention(q.float(), k.float(), v.float(), None if table is None else table.float(),
                               **kwargs).to(q.dtype)
    for bias_mode in ("bucket", "distance"):
        out = nan_filled((batch, query_length, heads, head_dim), q.dtype)
        result = attention(q, k, v, table, bias_mode=bias_mode, out=out, **kwargs)
        assert result is out
        torch.testing.assert_close(out, expected, atol=atol, rtol=rtol, msg=lambda m: f"{bias_mode}: {m}")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("heads, query_length, key_length, head_dim", [
    (3, 1, 7, 24), (5, 33, 33, 80), (3, 70, 40, 16), (2, 40, 70, 64),
])
def test_bidirectional_with_padding(heads, query_length, key_length, head_dim, dtype, atol, rtol, device,
                                    nan_filled):
    q, k, v = make_qkv(2, heads, query_length, key_length, head_dim, dtype, device)
    table = torch.randn(32, heads, device=device).to(dtype)
    mask = padding_mask(key_length, device, left=3, right=min(5, key_length - 1))
    check(q, k, v, table, nan_filled, atol, rtol, bidirectional=True, num_buckets=32, max_distance=16,
          key_padding_mask=mask)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("query_length, key_length, query_offset", [(40, 40, 0), (7, 70, 63), (33, 50, 1)])
def test_causal_with_query_offset(query_length, key_length, query_offset, dtype, atol, rtol, device, nan_filled):
    q, k, v = make_qkv(2, 3, query_length, key_length, 24, dtype, device)
    table = torch.randn(20, 3, device=device).to(dtype)
    check(q, k, v, table, nan_filled, atol, rtol, bidirectional=False, num_buckets=20, max_distance=16,
          causal=True, query_offset=query_offset, scale=0.125)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_causal_left_padding_rows_with_every_key_masked(dtype, atol, rtol, device, nan_filled):
    """Left-padded query rows see only padding keys; the reference then averages ALL of V, future
    keys included, so the kernel must not skip the future blocks for them."""
    q, k, v = make_qkv(2, 5, 40, 40, 16, dtype, device)
    table = torch.randn(8, 5, device=device).to(dtype)
    mask = padding_mask(40, device, left=35, right=3)
    check(q, k, v, table, nan_filled, atol, rtol, bidirectional=False, num_buckets=8, max_distance=16,
          key_padding_mask=mask, causal=True)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_no_bias_cross_attention(dtype, atol, rtol, device, nan_filled):
    q, k, v = make_qkv(2, 3, 7, 33, 80, dtype, device)
    mask = padding_mask(33, device, left=0, right=30)
    check(q, k, v, None, nan_filled, atol, rtol, bidirectional=True, num_buckets=32, max_distance=128,
          key_padding_mask=mask)


def test_all_keys_masked_averages_v(device, nan_filled):
    q, k, v = make_qkv(2, 3, 5, 9, 16, torch.float32, device)
    table = torch.randn(32, 3, device=device)
    mask = torch.zeros(2, 9, dtype=torch.bool, device=device)
    check(q, k, v, table, nan_filled, 2e-5, 1e-4, bidirectional=True, num_buckets=32, max_distance=128,
          key_padding_mask=mask)
    out = attention(q, k, v, table, bidirectional=True, num_buckets=32, max_distance=128, key_padding_mask=mask)
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).transpose(1, 2).expand_as(out))


def test_bias_by_distance_matches_position_bias(device):
    table = torch.randn(8, 3, device=device)
    vector = bias_by_distance(table, 7, 40, 5, bidirectional=False, num_buckets=8, max_distance=16)
    expected = eager.attention_scores(torch.zeros(1, 3, 7, 1, device=device), torch.zeros(1, 3, 40, 1, device=device),
                                      table, bidirectional=False, num_buckets=8, max_distance=16, query_offset=5)[0]
    query, key = torch.meshgrid(torch.arange(7), torch.arange(40), indexing="ij")
    torch.testing.assert_close(vector[:, key - query + 6], expected, atol=0, rtol=0)


@pytest.mark.cuda_only
@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16(causal, device, nan_filled):
    q, k, v = make_qkv(2, 4, 300, 300, 64, torch.bfloat16, device)
    table = torch.randn(32, 4, device=device).to(torch.bfloat16)
    mask = padding_mask(300, device, left=7, right=20)
    check(q, k, v, table, nan_filled, 2e-2, 2e-2, bidirectional=not causal, num_buckets=32, max_distance=128,
          key_padding_mask=mask, causal=causal)


@pytest.mark.parametrize("head_dim", [64, 160])  # 160: past the kernel's maximum, handed to eager
def test_triton_backend(head_dim, device):
    from umt5_fast.ops import triton as triton_ops
    q, k, v = make_qkv(2, 3, 9, 9, head_dim, torch.float32, device)
    table = torch.randn(32, 3, device=device)
    kwargs = dict(bidirectional=True, num_buckets=32, max_distance=128,
                  key_padding_mask=padding_mask(9, device, left=2, right=1))
    torch.testing.assert_close(triton_ops.attention(q, k, v, table, **kwargs),
                               eager.attention(q, k, v, table, **kwargs), atol=2e-5, rtol=1e-4)
