"""The C++ CPU kernels (umt5_fast.ops.cpu over umt5_fast._C) against umt5_fast.ops.eager.

Every kernel runs on each instruction set this CPU supports (the portable "generic" build,
"avx2", "avx512"), on odd shapes with fresh random inputs. Tolerances, fp32 throughout:
- attention / decode attention: rtol 1e-5, atol 1e-5 (online softmax and a polynomial exp
  reorder the sums; outputs are O(1));
- RMSNorm and the activations: rtol 1e-5, atol 1e-6 (1e-6 absorbs 1 + tanh(x) cancelling for very
  negative x, where torch's own tanh differs from libm just as much);
- int8 / bf16 linear: rtol 1e-5, atol 1e-5 against eager's dequantised fp32 GEMM (the kernel
  applies the int8 scale after the dot product instead of before).
"""
import math
import os
import platform

import pytest
import torch

_C = pytest.importorskip("umt5_fast._C", reason="the C++ extension umt5_fast._C is not built")

from umt5_fast import buckets  # noqa: E402
from umt5_fast.buckets import relative_position_bucket  # noqa: E402
from umt5_fast.ops import cpu, eager  # noqa: E402
from umt5_fast.quant import QuantizedWeight  # noqa: E402

ATTENTION_TOL = dict(rtol=1e-5, atol=1e-5)
POINTWISE_TOL = dict(rtol=1e-5, atol=1e-6)
LINEAR_TOL = dict(rtol=1e-5, atol=1e-5)


pytestmark = pytest.mark.usefixtures("every_cpu_isa")


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


def randn(*shape, generator):
    return torch.randn(*shape, generator=generator)


# ----------------------------------------------------------------------------------------------
# Buckets

# (19, 25): log(15 / 9) / log(25 / 9) is exactly 1/2, where torch's float32 log and libm's logf
# truncate to different buckets; (7, 3): max_distance below where the causal log buckets start
BUCKET_CONFIGS = [(32, 128), (20, 40), (8, 16), (64, 256), (19, 25), (23, 9), (37, 61), (5, 7), (7, 3)]


@pytest.mark.parametrize("num_buckets,max_distance", BUCKET_CONFIGS)
@pytest.mark.parametrize("bidirectional", [True, False])
def test_bucket_equals_torch_definition_everywhere(num_buckets, max_distance, bidirectional):
    first, last = -8192, 8192
    longest = buckets.longest_defined_distance(num_buckets, max_distance, bidirectional)
    if longest is not None:  # (past it transformers' formula is undefined: refused, see tests/kernels/test_bucket.py)
        first, last = -longest, longest
    expected = relative_position_bucket(torch.arange(first, last + 1), bidirectional, num_buckets,
                                        max_distance)
    table = buckets.distance_buckets(num_buckets, max_distance, bidirectional)
    got = torch.tensor(_C.relative_position_bucket_table(first, last, bidirectional, num_buckets, max_distance,
                                                         table.data_ptr()))
    mismatches = (got != expected).nonzero().flatten() + first
    assert mismatches.numel() == 0, f"buckets differ at relative positions {mismatches[:10].tolist()}"


def test_a_huge_max_distance_needs_no_huge_table(generator):
    """The bucket table stops at buckets.MAX_TABLE_DISTANCE: a config with a far larger
    relative_attention_max_distance runs (as the eager definition) on sequences below it, and a
    distance past it is a clear error, not a read past the table."""
    q, k, v = attention_inputs(1, 2, 20, 20, 8, generator)
    table = randn(32, 2, generator=generator)
    check_attention(q, k, v, table, bidirectional=True, num_buckets=32, max_distance=10**9)
    assert buckets.distance_buckets(32, 10**9, True).numel() == buckets.MAX_TABLE_DISTANCE
    with pytest.raises(ValueError, match="relative distances of 131072 or more are not supported"):
        buckets.check_distance(buckets.MAX_TABLE_DISTANCE, 32, 10**9, True)
    buckets.check_distance(buckets.MAX_TABLE_DISTANCE, 32, buckets.MAX_TABLE_DISTANCE, True)  # (no table needed)


@pytest.mark.parametrize("num_buckets,max_distance", [(19, 25), (37, 61)])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_takes_torch_buckets_where_logs_round_differently(num_buckets, max_distance, causal, generator):
    """Bucket configs with a distance whose float32 log ratio sits on a bucket boundary (where a
    C++ logf truncated to another bucket than torch's log): the kernels (prefill, decode step)
    add the eager definition's bias."""
    q, k, v = attention_inputs(3, 3, 70, 70, 4, generator)
    table = randn(num_buckets, 3, generator=generator) * 4  # (a wrong bucket moves the output by ~1)
    for bidirectional in (False, True):
        check_attention(q, k, v, table, bidirectional=bidirectional, num_buckets=num_buckets,
                        max_distance=max_distance, causal=causal and not bidirectional)
    got = cpu.decode_attention(q[:, :, :1], k, v, 60, table, num_buckets=num_buckets, max_distance=max_distance)
    expected = eager.decode_attention(q[:, :, :1], k, v, 60, table, num_buckets=num_buckets,
                                      max_distance=max_distance)
    torch.testing.assert_close(got, expected, **ATTENTION_TOL)


# ----------------------------------------------------------------------------------------------
# Attention

SHAPES = [  # batch, heads, query length, key length, head dim
    (2, 3, 1, 1, 24),
    (3, 5, 7, 33, 80),
    (2, 3, 33, 70, 64),
    (2, 5, 70, 7, 24),
    (3, 3, 200, 200, 64),
    (2, 3, 40, 40, 80),  # longer than max_distance=16: exercises the log buckets and the last one
    (1, 2, 45, 300, 40),  # keys past two 128-key softmax steps, the last one partial
]


def padding_mask(batch, length, side, generator):
    """Keep-mask [batch, length]: row b loses a random number of keys on `side`; row 0 keeps all."""
    mask = torch.ones(batch, length, dtype=torch.bool)
    for b in range(1, batch):
        padded = int(torch.randint(1, max(2, length), (1,), generator=generator))
        if side == "left":
            mask[b, :padded] = False
        else:
            mask[b, length - padded:] = False
    return mask


def attention_inputs(batch, heads, query_length, key_length, head_dim, generator):
    # q scaled so scores are O(1) as in trained models: raw randn scores reach +-30 at D = 64,
    # where one rounding of a score already moves the output by 1e-5.
    q = randn(batch, heads, query_length, head_dim, generator=generator) * head_dim ** -0.5
    k = randn(batch, heads, key_length, head_dim, generator=generator)
    v = randn(batch, heads, key_length, head_dim, generator=generator)
    return q, k, v


def check_attention(q, k, v, bias_table, **kwargs):
    got = cpu.attention(q, k, v, bias_table, **kwargs)
    expected = eager.attention(q, k, v, bias_table, **kwargs)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, **ATTENTION_TOL)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 16)])
def test_bidirectional_attention(shape, padding, num_buckets, max_distance, generator):
    batch, heads, query_length, key_length, head_dim = shape
    q, k, v = attention_inputs(*shape, generator)
    table = randn(num_buckets, heads, generator=generator)
    mask = None if padding is None else padding_mask(batch, key_length, padding, generator)
    check_attention(q, k, v, table, bidirectional=True, num_buckets=num_buckets,
                    max_distance=max_distance, key_padding_mask=mask)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_causal_attention_with_query_offset(shape, padding, generator):
    """Queries are the last Lq of Lk positions (a decoder continuing a prefix); a left-padded row
    has queries whose every visible key is padding: they must average V uniformly."""
    batch, heads, query_length, key_length, head_dim = shape
    q, k, v = attention_inputs(*shape, generator)
    table = randn(16, heads, generator=generator)
    mask = None if padding is None else padding_mask(batch, key_length, padding, generator)
    for query_offset in sorted({0, max(0, key_length - query_length)}):
        check_attention(q, k, v, table, bidirectional=False, num_buckets=16, max_distance=20,
                        key_padding_mask=mask, causal=True, query_offset=query_offset)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_attention_without_bias(shape, generator):
    """Cross-attention: no position bias, padded encoder keys, a scale."""
    batch, heads, query_length, key_length, head_dim = shape
    q, k, v = attention_inputs(*shape, generator)
    mask = padding_mask(batch, key_length, "right", generator)
    check_attention(q, k, v, None, bidirectional=True, num_buckets=32, max_distance=128,
                    key_padding_mask=mask, scale=0.125)
    check_attention(q, k, v, None, bidirectional=False, num_buckets=32, max_distance=128,
                    causal=True)


def test_attention_all_keys_masked_averages_values(generator):
    q, k, v = attention_inputs(2, 3, 7, 33, 24, generator)
    table = randn(32, 3, generator=generator)
    mask = torch.ones(2, 33, dtype=torch.bool)
    mask[1] = False
    check_attention(q, k, v, table, bidirectional=True, num_buckets=32, max_distance=128,
                    key_padding_mask=mask)
    got = cpu.attention(q, k, v, table, bidirectional=True, num_buckets=32, max_distance=128,
                        key_padding_mask=mask)
    torch.testing.assert_close(got[1], v[1].mean(dim=1)[None].expand(7, 3, 24), **ATTENTION_TOL)


def test_attention_all_ones_mask(generator):
    q, k, v = attention_inputs(2, 3, 33, 70, 24, generator)
    table = randn(32, 3, generator=generator)
    check_attention(q, k, v, table, bidirectional=True, num_buckets=32, max_distance=128,
                    key_padding_mask=torch.ones(2, 70, dtype=torch.bool))


@pytest.mark.parametrize("length", [33, 130])
def test_attention_on_strided_views(length, generator):
    """q/k/v as the model makes them: heads split from [B, L, H * D] projections, not copied (the
    kernel copies K and V into per-head rows where several query blocks read them)."""
    batch, heads, head_dim = 3, 5, 24
    qkv = randn(batch, length, 3, heads, head_dim, generator=generator)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    table = randn(32, heads, generator=generator)
    mask = padding_mask(batch, length, "left", generator)
    check_attention(q, k, v, table, bidirectional=True, num_buckets=32, max_distance=128,
                    key_padding_mask=mask, scale=0.5)
    check_attention(q, k, v, table, bidirectional=False, num_buckets=32, max_distance=20,
                    key_padding_mask=mask, causal=True)
    # cross-attention: fewer queries than keys, K and V from two projections of other widths
    keys = randn(batch, length + 7, heads, head_dim + 3, generator=generator)[..., 1:head_dim + 1]
    values = randn(batch, heads, head_dim, length + 7, generator=generator).transpose(2, 3)
    check_attention(q[:, :, :length - 1], keys.transpose(1, 2), values, None, bidirectional=True,
                    num_buckets=32, max_distance=128, key_padding_mask=padding_mask(batch, length + 7, "right", generator))


def test_attention_uint8_mask_and_fp16_table(generator):
    q, k, v = attention_inputs(2, 3, 7, 33, 64, generator)
    table = randn(32, 3, generator=generator).half()
    mask = padding_mask(2, 33, "right", generator).to(torch.uint8)
    check_attention(q, k, v, table, bidirectional=True, num_buckets=32, max_distance=128,
                    key_padding_mask=mask)


def test_fp16_attention_runs_the_fp32_kernel(generator):
    """fp16 q, k, v: the fp32 kernel (on an fp32 copy of q, reading K/V as they are), output rounded
    once to fp16: the bits of the fp32 op on widened inputs."""
    q, k, v = (t.half() for t in attention_inputs(2, 3, 7, 33, 64, generator))
    table = randn(32, 3, generator=generator)
    mask = torch.ones(2, 33, dtype=torch.bool)
    mask[1, :5] = False
    kwargs = dict(bidirectional=True, num_buckets=32, max_distance=128, key_padding_mask=mask)
    got = cpu.attention(q, k, v, table, **kwargs)
    assert got.dtype == torch.float16
    assert torch.equal(got, cpu.attention(q.float(), k.float(), v.float(), table, **kwargs).half())
    exact = eager.attention(q.double(), k.double(), v.double(), table.double(), **kwargs)
    assert (got.double() - exact).abs().max() <= torch.finfo(torch.float16).eps * exact.abs().max()


# bf16 q, k, v: the AVX512-BF16 kernel where the CPU has it and the ISA is avx512, else the fp32
# kernel reading the bf16 K/V. Against exact (fp64) attention on the same bf16 inputs, both are within
# 2^-7 max|v| (bf16's unit roundoff is 2^-8): the probabilities' rounding to bf16 before p @ v
# moves the output by at most 2^-8 max|v|, the output's rounding by 2^-8 |out| (products of bf16
# numbers are exact in fp32; fp32 sums add ~1e-6). Measured: at most 2.3e-3 max|v|; eager bf16
# attention (transformers' math, scores rounded to bf16) is 2-4x further off on the same inputs.
# Scales are powers of two here: any other is rounded into q (one more rounding of the scores).
BF16_ATTENTION_TOL = 2.0 ** -7


def check_bf16_attention(q, k, v, bias_table, **kwargs):
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    got = cpu.attention(q, k, v, bias_table, **kwargs)
    exact = eager.attention(q.double(), k.double(), v.double(),
                            None if bias_table is None else bias_table.double(), **kwargs)
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape and got.is_contiguous()
    error = (got.double() - exact).abs().max().item()
    assert error <= BF16_ATTENTION_TOL * v.double().abs().max().item(), error


@pytest.fixture(params=["avx512-bf16", "amx"])
def bf16_attention_kernel(request):
    """Run the test with each bf16 attention kernel this CPU (and the selected ISA) can run: the
    vdpbf16ps one (or, without AVX512-BF16, the fp32 one reading bf16 K/V), and the AMX one that
    takes problems of 16+ query rows where the CPU has AMX."""
    use_amx = request.param == "amx"
    if use_amx and not _C.has_amx_attention():
        pytest.skip("no AMX-BF16 here (or not under this ISA)")
    default = _C.amx_attention_enabled()
    _C.enable_amx_attention(use_amx)
    yield request.param
    _C.enable_amx_attention(default and _C.has_amx_attention())


# Shapes past the AMX kernel's tiles: 128-key softmax steps, 32-dim products, 16-row tiles.
BF16_ATTENTION_SHAPES = SHAPES + [(2, 3, 17, 129, 15), (1, 2, 65, 65, 33), (1, 2, 16, 300, 64),
                                  (2, 1, 47, 258, 96), (1, 3, 31, 1, 8)]


@pytest.mark.usefixtures("bf16_attention_kernel")
@pytest.mark.parametrize("shape", BF16_ATTENTION_SHAPES, ids=str)
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_bf16_attention(shape, padding, generator):
    """Odd head dims and key counts (key pairs split by padding and tile ends), one and many
    query rows, bidirectional, causal with a query offset, no bias with a scale."""
    batch, heads, query_length, key_length, head_dim = shape
    q, k, v = attention_inputs(*shape, generator)
    table = randn(16, heads, generator=generator)
    mask = None if padding is None else padding_mask(batch, key_length, padding, generator)
    check_bf16_attention(q, k, v, table, bidirectional=True, num_buckets=16, max_distance=20,
                         key_padding_mask=mask)
    for query_offset in sorted({0, max(0, key_length - query_length)}):
        check_bf16_attention(q, k, v, table, bidirectional=False, num_buckets=16, max_distance=20,
                             key_padding_mask=mask, causal=True, query_offset=query_offset)
    check_bf16_attention(q, k, v, None, bidirectional=True, num_buckets=16, max_distance=20,
                         key_padding_mask=mask, scale=0.5)


@pytest.mark.usefixtures("bf16_attention_kernel")
@pytest.mark.parametrize("length", [33, 130])
def test_bf16_attention_on_strided_views(length, generator):
    """bf16 q/k/v split from [B, L, H * D] projections, as a bf16 model makes them: within the bound
    of exact attention, and bit for bit what the same kernel gives on contiguous copies."""
    batch, heads, head_dim = 2, 5, 24
    qkv = randn(batch, length, 3, heads, head_dim, generator=generator).bfloat16()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    table = randn(16, heads, generator=generator)
    mask = padding_mask(batch, length, "left", generator)
    for options in (dict(bidirectional=True), dict(bidirectional=False, causal=True)):
        kwargs = dict(num_buckets=16, max_distance=20, key_padding_mask=mask, **options)
        check_bf16_attention(q, k, v, table, **kwargs)
        assert torch.equal(cpu.attention(q, k, v, table, **kwargs),
                           cpu.attention(q.contiguous(), k.contiguous(), v.contiguous(), table, **kwargs))


@pytest.mark.usefixtures("bf16_attention_kernel")
def test_bf16_attention_all_keys_masked_averages_values(generator):
    q, k, v = (t.bfloat16() for t in attention_inputs(2, 3, 17, 33, 24, generator))
    mask = torch.ones(2, 33, dtype=torch.bool)
    mask[1] = False
    got = cpu.attention(q, k, v, None, bidirectional=True, num_buckets=32, max_distance=128,
                        key_padding_mask=mask)
    expected = v[1].double().mean(dim=1)[None].expand(17, 3, 24)
    assert (got[1].double() - expected).abs().max() <= 2.0 ** -8 * expected.abs().max()  # one rounding


@pytest.mark.usefixtures("bf16_attention_kernel")
@pytest.mark.parametrize("score_scale", [8.0, 40.0])
def test_bf16_attention_wide_score_range(score_scale, generator):
    """Scores spread over hundreds: many probabilities fall below fp32's normal range (the bf16
    kernel's exp flushes them to 0), others lie just above it. Within the bound of exact attention,
    and a padded key adds nothing: huge values at padded keys leave the output bit for bit."""
    q, k, v = attention_inputs(2, 3, 40, 200, 32, generator)
    q = q * score_scale
    mask = padding_mask(2, 200, "left", generator)
    kwargs = dict(bidirectional=True, num_buckets=16, max_distance=20, key_padding_mask=mask)
    check_bf16_attention(q, k, v, randn(16, 3, generator=generator), **kwargs)
    got = cpu.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, **kwargs)
    v_padded_huge = v.masked_fill(~mask[:, None, :, None], 1e38)
    assert torch.equal(cpu.attention(q.bfloat16(), k.bfloat16(), v_padded_huge.bfloat16(), None, **kwargs), got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("query_length,key_length", [(1, 1), (1, 63), (1, 130), (7, 65), (40, 129), (70, 37)])
@pytest.mark.parametrize("head_dim", [24, 20])  # 20: partial vectors under every ISA's width
def test_half_attention_on_the_fp32_kernel_widens_exactly(dtype, causal, query_length, key_length, head_dim,
                                                        generator):
    """fp16 attention, and bf16 where the bf16 kernels cannot run (no AVX512-BF16, or another ISA
    selected): the fp32 kernel on q widened, reading K/V as they are (widened a key tile at a time
    for one query block, into copies for several): bit for bit the fp32 op on q.float(), k.float(),
    v.float(), rounded once; one row, several rows, several blocks, partial key tiles, strided views,
    padding and a fully masked row included."""
    batch, heads = 3, 5
    length = max(query_length, key_length)
    qkv = randn(batch, length, 3, heads, head_dim, generator=generator).to(dtype)
    q, k, v = (qkv[:, -n:, i].transpose(1, 2) for i, n in enumerate((query_length, key_length, key_length)))
    table = randn(16, heads, generator=generator)
    mask = padding_mask(batch, key_length, "left", generator)
    mask[1, -1] = False  # padding on both sides
    mask[2] = False  # every key of a row masked: the mean of the values
    kwargs = dict(bidirectional=not causal, num_buckets=16, max_distance=20, key_padding_mask=mask,
                  causal=causal, query_offset=key_length - query_length if causal else 0)
    got = cpu.attention(q, k, v, table, **kwargs)
    widened = cpu.attention(q.float(), k.float(), v.float(), table, **kwargs).to(dtype)
    assert got.dtype == dtype and got.shape == (batch, query_length, heads, head_dim)
    if dtype == torch.bfloat16 and _C.has_bf16_attention():  # bf16 products: other bits
        assert (got.float() - widened.float()).abs().max() <= BF16_ATTENTION_TOL * v.float().abs().max()
    else:
        assert torch.equal(got, widened)


def test_amx_attention_switch():
    """The AMX kernel is on by default where the CPU has it, can be turned off and back on, and
    refuses to be turned on where it cannot run."""
    if not _C.has_amx_attention():
        assert not _C.amx_attention_enabled()
        with pytest.raises(ValueError, match="AMX"):
            _C.enable_amx_attention(True)
        return
    assert _C.amx_attention_enabled()
    _C.enable_amx_attention(False)
    assert not _C.amx_attention_enabled()
    _C.enable_amx_attention(True)
    assert _C.amx_attention_enabled()


# ----------------------------------------------------------------------------------------------
# Decode attention

@pytest.mark.parametrize("cache_length", [1, 7, 33, 50])
@pytest.mark.parametrize("padding", [None, "left"])
@pytest.mark.parametrize("batch,heads,head_dim", [(2, 3, 24), (3, 5, 80), (2, 3, 64)])
def test_decode_attention(cache_length, padding, batch, heads, head_dim, generator):
    max_length = 50
    q = randn(batch, heads, 1, head_dim, generator=generator)
    k_cache = randn(batch, heads, max_length, head_dim, generator=generator)
    v_cache = randn(batch, heads, max_length, head_dim, generator=generator)
    table = randn(16, heads, generator=generator)
    mask = None if padding is None else padding_mask(batch, max_length, padding, generator)
    kwargs = dict(num_buckets=16, max_distance=20, key_padding_mask=mask)
    expected = eager.decode_attention(q, k_cache, v_cache, cache_length, table, **kwargs)
    for length in (cache_length, torch.tensor(cache_length)):
        got = cpu.decode_attention(q, k_cache, v_cache, length, table, **kwargs)
        assert got.shape == (batch, 1, heads, head_dim)
        torch.testing.assert_close(got, expected, **ATTENTION_TOL)


@pytest.mark.usefixtures("every_cpu_isa")
@pytest.mark.parametrize("cache_length", [1, 9, 50])
@pytest.mark.parametrize("padding", [None, "left"])
def test_decode_attention_of_a_bf16_cache(cache_length, padding, generator):
    """A bf16 model's decode step: the query row through ``attention`` (the bf16 kernel where the
    CPU has AVX512-BF16, else the fp32 one on copies) on the written part of the cache, so a decode
    step computes what a prefill of the same row computes; within bf16's tolerance of fp64."""
    batch, heads, head_dim, max_length = 3, 5, 24, 50
    q, k_cache, v_cache = (randn(batch, heads, rows, head_dim, generator=generator).bfloat16()
                           for rows in (1, max_length, max_length))
    table = randn(16, heads, generator=generator)
    mask = None if padding is None else padding_mask(batch, max_length, padding, generator)
    kwargs = dict(num_buckets=16, max_distance=20)
    got = cpu.decode_attention(q, k_cache, v_cache, cache_length, table, key_padding_mask=mask, **kwargs)
    written = dict(key_padding_mask=None if mask is None else mask[:, :cache_length], causal=True,
                   query_offset=cache_length - 1, bidirectional=False, **kwargs)
    keys, values = k_cache[:, :, :cache_length], v_cache[:, :, :cache_length]
    assert got.dtype == torch.bfloat16 and got.shape == (batch, 1, heads, head_dim)
    assert torch.equal(got, cpu.attention(q, keys, values, table, **written))
    exact = eager.attention(q.double(), keys.double(), values.double(), table.double(), **written)
    assert (got.double() - exact).abs().max() <= BF16_ATTENTION_TOL * values.double().abs().max()


# ----------------------------------------------------------------------------------------------
# RMSNorm

@pytest.mark.parametrize("shape", [(1, 512), (3, 7, 80), (5, 1), (17, 77)], ids=str)
def test_rms_norm(shape, generator):
    x = randn(*shape, generator=generator) * 3
    weight = randn(shape[-1], generator=generator)
    torch.testing.assert_close(cpu.rms_norm(x, weight, 1e-6), eager.rms_norm(x, weight, 1e-6),
                               **POINTWISE_TOL)


@pytest.mark.parametrize("shape", [(1, 512), (3, 7, 80), (17, 77)], ids=str)
def test_add_rms_norm(shape, generator):
    x, residual = randn(*shape, generator=generator), randn(*shape, generator=generator)
    weight = randn(shape[-1], generator=generator)
    hidden, normed = cpu.add_rms_norm(x, residual, weight, 1e-6)
    torch.testing.assert_close(hidden, residual + x, rtol=0, atol=0)
    torch.testing.assert_close(normed, eager.rms_norm(residual + x, weight, 1e-6), **POINTWISE_TOL)


def test_rms_norm_half_weight_falls_back_to_eager(generator):
    x, weight = randn(3, 80, generator=generator), randn(80, generator=generator).bfloat16()
    got = cpu.rms_norm(x, weight, 1e-6)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, eager.rms_norm(x, weight, 1e-6), rtol=0, atol=0)


def half_ulps(got, expected):
    """Distance in units in the last place of two bf16 or two fp16 tensors (same-sign values)."""
    return (got.view(torch.int16).int() - expected.view(torch.int16).int()).abs()


@pytest.mark.parametrize("shape", [(1, 512), (3, 7, 80), (5, 1), (17, 77), (2, 4096), (3, 33)], ids=str)
@pytest.mark.parametrize("x_dtype,dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                           (torch.float32, torch.float16)], ids=str)
def test_rms_norm_of_a_half_precision_model(shape, x_dtype, dtype, generator):
    """T5LayerNorm of a bf16 / fp16 model (x of the weight's dtype, or the fp32 residual stream an
    fp16 model's fp32 `wo` leaves): fp32 variance, h rounded to the weight's dtype, times the weight
    and rounded again. Against the same formula in fp64: at most two ulps apart (the fp32 variance
    sums in another order, which can move h's rounding by one ulp, which the weight (|w| < 2 here)
    carries into the product before its own rounding), and eager is held to the same bound. Bit for
    bit the fp32 kernel on the widened rows with those roundings (vector tails included)."""
    x = (randn(*shape, generator=generator) * 3).to(x_dtype)
    weight = (randn(shape[-1], generator=generator) + 1).to(dtype)
    got = cpu.rms_norm(x, weight, 1e-6)
    inverse_rms = torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    expected = ((x.double() * inverse_rms).to(dtype).double() * weight.double()).to(dtype)
    assert got.dtype == dtype and got.shape == x.shape
    assert half_ulps(got, expected).max() <= 2 and (half_ulps(got, expected) > 0).float().mean() < 0.01
    assert half_ulps(eager.rms_norm(x, weight, 1e-6), expected).max() <= 2
    normed = cpu.rms_norm(x.float(), torch.ones(shape[-1]), 1e-6).to(dtype)
    assert torch.equal(got, (normed.float() * weight.float()).to(dtype))


# ----------------------------------------------------------------------------------------------
# Gated FFN and activations

ACTIVATIONS = ["gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_pointwise_over_wide_range(activation):
    """Through an identity projection: act(x) itself, from deep saturation to 0."""
    x = torch.linspace(-12, 12, 20001).reshape(-1, 3)
    identity = torch.eye(3)
    torch.testing.assert_close(cpu.gated_ffn_in(x, identity, None, activation),
                               eager.ACTIVATIONS[activation](x), **POINTWISE_TOL)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("weights", ["fp32", "int8", "bf16"])
def test_gated_ffn_in(activation, gated, weights, generator):
    x = randn(3, 7, 40, generator=generator)
    w_gate, w_up = randn(67, 40, generator=generator), randn(67, 40, generator=generator)
    if weights == "int8":
        w_gate, w_up = QuantizedWeight.quantize(w_gate), QuantizedWeight.quantize(w_up)
    elif weights == "bf16":
        w_gate, w_up = w_gate.bfloat16(), w_up.bfloat16()
    w_up = w_up if gated else None
    torch.testing.assert_close(cpu.gated_ffn_in(x, w_gate, w_up, activation),
                               eager.gated_ffn_in(x, w_gate, w_up, activation), **LINEAR_TOL)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gated_ffn_in_of_a_half_precision_model(activation, gated, dtype, generator):
    """bf16 / fp16 x and weights: the projections' outputs go through act(a) * b in fp32, rounded to
    x's dtype once (eager rounds after each op): equal to torch's fp32 formulas rounded once up to
    one ulp, and at least as often equal to the fp64 formulas rounded once as those are (their fp32
    1 + tanh / 1 + erf cancel for negative inputs; ours differ there, not worse)."""
    x = randn(3, 7, 40, generator=generator).to(dtype)
    w_gate, w_up = randn(67, 40, generator=generator).to(dtype), randn(67, 40, generator=generator).to(dtype)
    w_up = w_up if gated else None
    got = cpu.gated_ffn_in(x, w_gate, w_up, activation)
    def formula(precision):
        gate = eager.ACTIVATIONS[activation](cpu.linear(x, w_gate).to(precision))
        return (gate if w_up is None else gate * cpu.linear(x, w_up).to(precision)).to(dtype)
    expected, exact = formula(torch.float32), formula(torch.float64)
    assert got.dtype == dtype
    # one ulp (rtol=2**-8 was half a bf16 ulp at the bottom of a binade: torch's bf16 GEMM sums
    # in another order on AVX2-only CPUs); tails near 0, where ulps mean nothing, within 1e-5
    within = (half_ulps(got, expected) <= 1) | ((got.float() - expected.float()).abs() <= 1e-5)
    assert within.all(), (got.float() - expected.float()).abs().max()
    # measured: bf16 0.85-1.0 both; fp16 gelu (erf) 0.93 against 0.90. Eager (rounding every op)
    # agrees with the fp32 formulas 0.65-0.87 of the time.
    assert (got == exact).float().mean() >= (expected == exact).float().mean() - 0.01


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 70, 256])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("native_gemm", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_of_a_half_precision_model(rows, with_residual, native_gemm, dtype, generator, monkeypatch):
    """bf16 / fp16 x and weight: the C++ kernel on the widened x (fp32 sums, rounded once) up to
    HALF_KERNEL_MAX_ROWS rows where oneDNN has the dtype's instructions, above them torch's GEMM in
    that dtype; without those instructions the C++ kernels up to fp32_kernel_max_rows() rows (the
    GEMV, then the panel GEMM), above them torch's fp32 GEMM on the widened operands; all within one
    ulp of the exact product rounded once (plus the residual's own rounding)."""
    monkeypatch.setattr(cpu, "NATIVE_BF16_GEMM" if dtype == torch.bfloat16 else "NATIVE_FP16_GEMM", native_gemm)
    calls = []
    kernel = {torch.bfloat16: "bf16_linear", torch.float16: "fp16_linear"}[dtype]
    original = getattr(_C, kernel)
    monkeypatch.setattr(_C, kernel, lambda **kw: calls.append(kw["rows"]) or original(**kw))
    widen = cpu._half_linear_through_fp32
    monkeypatch.setattr(cpu, "_half_linear_through_fp32", lambda *a: calls.append("widened") or widen(*a))
    x, weight = randn(rows, 133, generator=generator).to(dtype), randn(71, 133, generator=generator).to(dtype)
    residual = randn(rows, 71, generator=generator).to(dtype) if with_residual else None
    got = cpu.linear(x, weight, residual)
    exact = (x.double() @ weight.double().T).to(dtype)
    assert got.dtype == dtype
    limit = cpu.HALF_KERNEL_MAX_ROWS if native_gemm or _C.cpu_isa() == "generic" else cpu.fp32_kernel_max_rows()
    assert cpu.half_kernel_max_rows(dtype) == limit
    assert calls == ([rows] if rows <= limit else [] if native_gemm else ["widened"])
    if residual is None:
        # (near 0 an fp32 sum's own error spans several fp16 ulps, whatever order it sums in)
        assert ((half_ulps(got, exact) <= 1) | ((got.double() - exact.double()).abs() <= 1e-5)).all()
    else:
        torch.testing.assert_close(got, exact + residual, rtol=2 ** -7, atol=2 ** -7)
        torch.testing.assert_close(got, eager.linear(x, weight, residual), rtol=2 ** -7, atol=2 ** -7)


def test_fp16_weights_widen_exactly():
    """Every fp16 value as a weight: with one input feature (fewer than a vector: the scalar
    widening) y = 1 * w is torch's widening bit for bit (inf included, NaN stays NaN); with 16
    features and one-hot inputs every finite value through the vector widening likewise."""
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    widened = values.float()
    got = cpu.kernel_linear(torch.ones(1, 1), values[:, None])[0]
    nan = widened.isnan()
    assert torch.equal(got[~nan], widened[~nan]) and got[nan].isnan().all()
    finite = values[widened.isfinite()].reshape(-1, 16)
    got = cpu.kernel_linear(torch.eye(16), finite)  # row j: feature j of every weight row
    assert torch.equal(got, finite.float().T)


@pytest.mark.usefixtures("every_cpu_isa")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cols", [2, 15, 16, 37])
def test_half_precision_gated_activation_rounds_like_torch(dtype, cols, generator):
    """relu(a) * b of bf16 / fp16 rows is exact in fp32 (8 + 8 or 11 + 11 significant bits), so its
    one rounding must give torch's own rounding of the fp32 product bit for bit: finite inputs of
    every exponent, products that overflow (column 0: inf) and that round among subnormals (column 1),
    negative values, vector tails."""
    finfo = torch.finfo(dtype)
    a = (torch.rand(9, cols, generator=generator) * 2 - 0.5).to(dtype)  # some negative: relu -> 0
    exponents = torch.randint(int(math.log2(finfo.tiny)) - 6, int(math.log2(finfo.max)) - 2, (9, cols),
                              generator=generator)
    b = (randn(9, cols, generator=generator) * torch.exp2(exponents.float())).to(dtype)
    a[:, :2] = (torch.rand(9, 2, generator=generator) + 1.1).to(dtype)
    b[:, 0] = finfo.max
    b[:, 1] = (0.4 * finfo.tiny * torch.rand(9, generator=generator)).to(dtype)
    assert b.isfinite().all()
    out = torch.empty_like(a)
    kernel = {torch.bfloat16: _C.gated_activation_bf16, torch.float16: _C.gated_activation_fp16}[dtype]
    kernel(activation="relu", a=a.data_ptr(), a_row_stride=cols, b=b.data_ptr(), b_row_stride=cols,
           out=out.data_ptr(), out_row_stride=cols, rows=9, cols=cols, num_threads=2)
    expected = (a.float().relu() * b.float()).to(dtype)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
    assert expected[:, 0].isinf().all() and (expected[:, 1].abs() < finfo.tiny).all()
    # gelu_tanh in place (out = a): the fp32 kernel's values on the widened rows, rounded once
    widened, a_wide, b_wide = torch.empty(9, cols), a.float(), b.float()
    _C.gated_activation(activation="gelu_tanh", a=a_wide.data_ptr(), a_row_stride=cols, b=b_wide.data_ptr(),
                        b_row_stride=cols, out=widened.data_ptr(), out_row_stride=cols, rows=9, cols=cols,
                        num_threads=2)
    kernel(activation="gelu_tanh", a=a.data_ptr(), a_row_stride=cols, b=b.data_ptr(), b_row_stride=cols,
           out=a.data_ptr(), out_row_stride=cols, rows=9, cols=cols, num_threads=2)
    assert torch.equal(a.view(torch.int16), widened.to(dtype).view(torch.int16))


@pytest.mark.usefixtures("every_cpu_isa")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40, 256])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("native_gemm", [True, False])
def test_int8_weights_in_a_half_precision_model(rows, with_residual, dtype, native_gemm, generator, monkeypatch):
    """bf16 / fp16 x with weight-only int8: up to half_kernel_max_rows() rows the C++ int8 kernel on
    the widened x (the exact product of x and scale * q, rounded once, then the residual added in
    x's dtype); above them eager's expansion to x's dtype and torch's GEMM where that runs on the
    dtype's instructions, else torch's fp32 GEMM on the widened x and the weight expanded to fp32,
    rounded once; all within 2^-7 of the largest exact output."""
    monkeypatch.setattr(cpu, "NATIVE_BF16_GEMM" if dtype == torch.bfloat16 else "NATIVE_FP16_GEMM", native_gemm)
    x = randn(rows, 133, generator=generator).to(dtype)
    weight = QuantizedWeight.quantize(randn(71, 133, generator=generator))
    residual = randn(rows, 71, generator=generator).to(dtype) if with_residual else None
    got = cpu.linear(x, weight, residual)
    assert got.dtype == dtype and got.shape == (rows, 71)
    exact = x.double() @ weight.dequantize(torch.float32).double().T
    assert cpu.half_kernel_max_rows(dtype) == (cpu.HALF_KERNEL_MAX_ROWS if native_gemm or _C.cpu_isa() == "generic"
                                                else cpu.fp32_kernel_max_rows())
    if rows <= cpu.half_kernel_max_rows(dtype):
        rounded = cpu.kernel_linear(x.float(), weight).to(dtype)
        assert torch.equal(got, rounded if residual is None else rounded + residual)
        if dtype == torch.bfloat16:
            assert half_ulps(rounded, exact.bfloat16()).max() <= 1
    elif native_gemm:
        assert torch.equal(got, eager.linear(x, weight, residual))
    else:
        rounded = torch.nn.functional.linear(x.float(), weight.dequantize(torch.float32)).to(dtype)
        assert torch.equal(got, rounded if residual is None else rounded + residual)
    # eager rounds the expanded weights to bf16 too: errors relative to the largest output
    reference = exact if residual is None else exact + residual.double()
    assert (got.double() - reference).abs().max() <= 2 ** -7 * reference.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("int8_weight", [False, True])
def test_half_linear_through_fp32_widens_in_chunks(dtype, int8_weight, generator, monkeypatch):
    """A weight (of x's dtype, or weight-only int8) wider than HALF_WIDEN_CHUNK is widened a slice
    of output features at a time (the last one partial); each slice's columns are the fp32 GEMM's
    of that slice, rounded once, and the unsliced product's where the GEMM's column sums do not
    depend on how many columns it computes (MKL's on Intel CPUs; on AMD ones its AVX2 kernels sum
    a 10-column slice in another order, one rounding step apart)."""
    x, weight = randn(2, 19, 40, generator=generator).to(dtype), randn(103, 40, generator=generator)
    weight = QuantizedWeight.quantize(weight) if int8_weight else weight.to(dtype)
    dense = weight.dequantize(torch.float32) if int8_weight else weight
    whole = cpu._half_linear_through_fp32(x, weight)
    monkeypatch.setattr(cpu, "HALF_WIDEN_CHUNK", 40 * 10)
    chunked = cpu._half_linear_through_fp32(x, weight)
    assert chunked.shape == (2, 19, 103) and chunked.dtype == dtype
    xf = x.reshape(-1, 40).float()
    sliced = torch.cat([torch.nn.functional.linear(xf, dense[n:n + 10].float()) for n in range(0, 103, 10)], dim=1)
    assert torch.equal(chunked, sliced.to(dtype).view(2, 19, 103))
    if torch.equal(sliced, torch.nn.functional.linear(xf, dense.float())):
        assert torch.equal(chunked, whole)
    assert cpu._half_linear_through_fp32(x, dense[:0]).shape == (2, 19, 0)
    exact = (x.double() @ dense.double().T).to(dtype)
    # one ulp, or fp32 cancellation (~1e-6 of the operands) where the result is near 0
    assert ((half_ulps(whole, exact) <= 1) | ((whole.double() - exact.double()).abs() <= 1e-5)).all()


def test_half_linear_through_fp32_buffers_are_per_thread(generator, monkeypatch):
    """The widening buffer is kept between calls, one per thread: threads multiplying different
    weights at once (several slices each) get the serial results, and a later wider weight grows it."""
    import concurrent.futures
    monkeypatch.setattr(cpu, "HALF_WIDEN_CHUNK", 48 * 16)
    x = randn(5, 48, generator=generator).bfloat16()
    weights = [randn(70 + 9 * i, 48, generator=generator).bfloat16() for i in range(4)]
    serial = [cpu._half_linear_through_fp32(x, w) for w in weights]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(20):
            got = list(pool.map(lambda w: cpu._half_linear_through_fp32(x, w), weights))
            assert all(torch.equal(a, b) for a, b in zip(got, serial))
    monkeypatch.setattr(cpu, "HALF_WIDEN_CHUNK", 1 << 20)
    wide = randn(300, 48, generator=generator).bfloat16()
    with torch.inference_mode():  # the buffer grows here, then serves a call outside inference mode
        in_inference = cpu._half_linear_through_fp32(x, wide)
    assert torch.equal(cpu._half_linear_through_fp32(x, wide), in_inference)
    exact = (x.double() @ wide.double().T).bfloat16()
    got = cpu._half_linear_through_fp32(x, wide)
    assert ((half_ulps(got, exact) <= 1) | ((got.double() - exact.double()).abs() <= 1e-5)).all()


def test_half_linear_through_fp32_keeps_autograd(generator):
    """With gradients wanted the widened slices are fresh tensors, not the kept buffer: two products
    recorded before either backward both differentiate, to the gradients of the fp32 product."""
    x = randn(21, 40, generator=generator).bfloat16().requires_grad_()
    weights = [randn(103, 40, generator=generator).bfloat16().requires_grad_() for _ in range(2)]
    outputs = [cpu._half_linear_through_fp32(x, w) for w in weights]
    for w, y in zip(weights, outputs):
        x.grad = None
        y.float().sum().backward()
        xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        torch.nn.functional.linear(xf, wf).sum().backward()
        torch.testing.assert_close(x.grad.float(), xf.grad, rtol=2 ** -7, atol=2 ** -7)
        torch.testing.assert_close(w.grad.float(), wf.grad, rtol=2 ** -7, atol=2 ** -7)


def test_unknown_activation_falls_back_to_eager(generator):
    x, w = randn(3, 40, generator=generator), randn(67, 40, generator=generator)
    torch.testing.assert_close(cpu.gated_ffn_in(x, w, w, "quick_gelu"),
                               eager.gated_ffn_in(x, w, w, "quick_gelu"))


# ----------------------------------------------------------------------------------------------
# Weight-only linear

WEIGHT_FORMS = {"int8": QuantizedWeight.quantize, "bf16": torch.Tensor.bfloat16, "fp16": torch.Tensor.half,
                "fp32": lambda w: w}

# every row-block remainder of the GEMV; from 33 the panel GEMM, with partial tiles of rows
@pytest.mark.parametrize("rows", [1, 2, 3, 6, 17, 33, 45, 64])
# 257: several chunks of columns of the panel GEMM, and a partial panel
@pytest.mark.parametrize("out_features,in_features", [(71, 133), (257, 64), (5, 7)])
@pytest.mark.parametrize("weights", ["int8", "bf16", "fp16", "fp32"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_weight_only_linear(rows, out_features, in_features, weights, with_residual, generator):
    """int8 / bf16 / fp16 weights always take the C++ kernel; fp32 weights up to fp32_kernel_max_rows() rows."""
    x = randn(rows, in_features, generator=generator)
    weight = randn(out_features, in_features, generator=generator)
    weight = WEIGHT_FORMS[weights](weight)
    residual = randn(rows, out_features, generator=generator) if with_residual else None
    torch.testing.assert_close(cpu.linear(x, weight, residual), eager.linear(x, weight, residual),
                               **LINEAR_TOL)


def dequantized(weight) -> torch.Tensor:
    """An int8 / bf16 / fp16 / fp32 weight's exact values in fp64."""
    if isinstance(weight, QuantizedWeight):
        return weight.qweight.double() * weight.scale.double()[:, None]
    return weight.double()


@pytest.mark.parametrize("weights", ["int8", "bf16", "fp16", "fp32"])
@pytest.mark.parametrize("rows,in_features", [(33, 1100), (45, 513), (70, 1537), (255, 600), (40, 16)])
def test_panel_gemm_is_within_fp32_summation_error(rows, in_features, weights, generator):
    """The panel GEMM (33+ rows) against the fp64 product: every output within the error bound of
    fp32 summation in any order, gamma_(K+2) * (|x| @ |w|^T + |residual|) (gamma_n = n u / (1 - n u),
    u = 2^-24; two more roundings for the int8 scale and the residual). Past 512 values of k the sums
    run in blocks (kPanelDepth), kept between them: a lost or doubled block is off by O(1) outputs.
    (Against eager's fp32 GEMM a fixed 1e-5 fails for either at such depths: both are fp32 sums.)"""
    x = randn(rows, in_features, generator=generator)
    weight = WEIGHT_FORMS[weights](randn(141, in_features, generator=generator))
    residual = randn(rows, 141, generator=generator)
    got = cpu.kernel_linear(x, weight, residual).double()
    exact = x.double() @ dequantized(weight).t() + residual.double()
    n = in_features + 2
    gamma = n * 2.0 ** -24 / (1 - n * 2.0 ** -24)
    bound = gamma * (x.double().abs() @ dequantized(weight).abs().t() + residual.double().abs())
    assert bool(((got - exact).abs() <= bound).all())
    assert float((got - exact).abs().max()) > 0  # (not an fp64 product)


@pytest.mark.parametrize("weights", ["int8", "bf16", "fp16", "fp32"])
@pytest.mark.parametrize("in_features", [77, 1100])
def test_panel_gemm_sums_each_output_alone(weights, in_features, generator):
    """From 33 rows: an output's bits depend on its x row and weight row only (not on the other rows,
    the columns around it, or how columns fall into chunks and panels), which the LM head screen's
    candidate logits rely on; and y may be the residual's own memory (the decoder step adds
    attention and FFN outputs onto the residual stream in place)."""
    x = randn(70, in_features, generator=generator)
    weight = WEIGHT_FORMS[weights](randn(300, in_features, generator=generator))
    full = cpu.kernel_linear(x, weight)
    rows = torch.tensor([69, 3, 40, 41, 0] + list(range(5, 33)))  # 33 rows in another order
    columns = torch.tensor([299, 7, 130, 131, 0])
    subset = (QuantizedWeight(weight.qweight[columns], weight.scale[columns]) if weights == "int8"
              else weight[columns])
    assert torch.equal(cpu.kernel_linear(x[rows], subset), full[rows][:, columns])
    residual = randn(70, 300, generator=generator)
    expected = cpu.kernel_linear(x, weight, residual.clone())
    torch.testing.assert_close(expected, full + residual, rtol=0, atol=0)
    sizes = dict(rows=70, in_features=in_features, out_features=300, num_threads=2)
    if weights == "int8":
        _C.int8_linear(x=x.data_ptr(), qweight=weight.qweight.data_ptr(), scale=weight.scale.data_ptr(),
                       residual=residual.data_ptr(), y=residual.data_ptr(), **sizes)
    else:
        kernel = {"bf16": _C.bf16_linear, "fp16": _C.fp16_linear, "fp32": _C.f32_linear}[weights]
        kernel(x=x.data_ptr(), weight=weight.data_ptr(), residual=residual.data_ptr(), y=residual.data_ptr(),
               **sizes)
    assert torch.equal(residual, expected)


@pytest.mark.parametrize("weights", ["fp32", "int8", "bf16"])
@pytest.mark.parametrize("rows", [5, 40])
def test_linear_writes_into_out_where_it_can(weights, rows, generator):
    """``out`` (a decode step's reused logits memory) receives the C++ kernels' result when it is a
    contiguous fp32 tensor of the result's shape; anything else, or torch's GEMM, ignores it and
    never writes it."""
    x = randn(rows, 77, generator=generator)
    weight = WEIGHT_FORMS[weights](randn(67, 77, generator=generator))
    expected = cpu.linear(x, weight)
    out = torch.full((rows, 67), math.nan)
    got = cpu.linear(x, weight, out=out)
    assert torch.equal(got, expected)
    if weights == "fp32" and rows > cpu.fp32_kernel_max_rows():  # (the portable build's GEMM)
        assert got.data_ptr() != out.data_ptr() and bool(out.isnan().all())
        return
    assert got.data_ptr() == out.data_ptr()
    for unusable in (torch.full((rows, 68), math.nan), torch.full((67, rows), math.nan).t(),
                     torch.full((rows, 67), math.nan, dtype=torch.float64)):
        got = cpu.linear(x, weight, out=unusable)
        assert got.data_ptr() != unusable.data_ptr() and torch.equal(got, expected)
        assert bool(unusable.isnan().all())
    assert torch.equal(eager.linear(x, weight, out=out), eager.linear(x, weight))  # eager: a hint it ignores


def test_weight_only_linear_keeps_leading_dims(generator):
    x = randn(2, 3, 133, generator=generator)
    weight = QuantizedWeight.quantize(randn(71, 133, generator=generator))
    got = cpu.linear(x, weight)
    assert got.shape == (2, 3, 71)
    torch.testing.assert_close(got, eager.linear(x, weight), **LINEAR_TOL)


def test_fp32_decode_rows_take_the_kernel(generator, monkeypatch):
    calls = []
    kernel = _C.f32_linear
    monkeypatch.setattr(cpu._C, "f32_linear", lambda **kw: calls.append(kw["rows"]) or kernel(**kw))
    x, weight = randn(2, 3, 40, generator=generator), randn(67, 40, generator=generator)
    torch.testing.assert_close(cpu.linear(x, weight), eager.linear(x, weight), **LINEAR_TOL)
    cpu.linear(randn(40, 40, generator=generator), weight)  # the panel GEMM (portable build: torch's GEMM)
    cpu.linear(randn(cpu.fp32_kernel_max_rows() + 1, 40, generator=generator), weight)  # torch's GEMM
    assert calls == ([6] if _C.cpu_isa() == "generic" else [6, 40])


ONEDNN_LINEAR_OPS = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                     and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def count_wide_gemms(monkeypatch):
    """The shapes of x in each wide GEMM ``cpu.linear`` runs from now on (a list that grows)."""
    calls = []
    wide_gemm = cpu._wide_gemm
    monkeypatch.setattr(cpu, "_wide_gemm", lambda x, w: calls.append(x.shape) or wide_gemm(x, w))
    return calls


@pytest.mark.skipif(not cpu.WIDE_GEMMS, reason="wide fp32 GEMMs are taken on AVX-512 CPUs only")
@pytest.mark.parametrize("engine", ["onednn", "mkl"])
@pytest.mark.parametrize("shape", [(256, 133), (2, 150, 77), (3, 331, 1)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("weights", ["fp32", "int8", "bf16", "fp16"])
def test_products_of_many_rows_take_a_wide_gemm(engine, shape, with_residual, weights, generator, monkeypatch):
    """From WIDE_GEMM_MIN_ROWS rows on, products run as one fp32 GEMM in either engine, int8 / bf16
    weights expanded to fp32 for the call: fp32 accuracy against fp64 (odd sizes, leading dims, a
    residual, a non-contiguous x); fewer rows, big weights (an LM head) and autograd stay with the
    kernels / torch's GEMM."""
    if engine == "onednn" and not ONEDNN_LINEAR_OPS:
        pytest.skip("torch has no oneDNN linear ops here")
    monkeypatch.setattr(cpu, "WIDE_GEMMS_IN_ONEDNN", engine == "onednn")
    calls = count_wide_gemms(monkeypatch)
    reorders = []
    reorder = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", lambda *a: reorders.append(1) or reorder(*a))
    x = randn(*shape[:-1], 2 * shape[-1], generator=generator)[..., ::2]  # non-contiguous
    weight = randn(67, shape[-1], generator=generator)
    weight = WEIGHT_FORMS[weights](weight)
    dense = weight.dequantize() if weights == "int8" else weight.float()
    residual = randn(*shape[:-1], 67, generator=generator) if with_residual else None
    got = cpu.linear(x, weight, residual)
    exact = x.double() @ dense.double().T + (0 if residual is None else residual.double())
    assert got.shape == (*shape[:-1], 67) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=1e-5 * float(exact.abs().max()))
    assert len(calls) == 1 and len(reorders) == (engine == "onednn")
    cpu.linear(x[..., :cpu.WIDE_GEMM_MIN_ROWS - 1, :] if x.dim() == 2 else x[:1, :100], weight)  # fewer rows
    monkeypatch.setattr(cpu, "WIDE_GEMM_MAX_WEIGHT", math.prod(weight.shape) - 1)
    cpu.linear(x, weight)  # a weight too big to expand or reorder per call
    monkeypatch.setattr(cpu, "WIDE_GEMM_MAX_WEIGHT", math.prod(weight.shape))
    if weights != "fp32":
        assert len(calls) == 1
        return
    with torch.enable_grad():
        trained = weight.clone().requires_grad_()
        cpu.linear(x, trained).sum().backward()  # torch's GEMM, which has autograd
    assert len(calls) == 1 and trained.grad is not None


def test_wide_gemm_engine_follows_the_cpu_vendor():
    """MKL where it runs AVX-512 code (Intel CPUs), oneDNN on other AVX-512 CPUs."""
    assert cpu.WIDE_GEMMS == ("avx512" in _C.supported_cpu_isas())
    vendor = _C.cpu_vendor()
    cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    expected = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}
    for name, short in expected.items():
        if f"vendor_id\t: {name}" in cpuinfo:
            assert vendor == short
    assert vendor in ("intel", "amd", "other")
    assert cpu.WIDE_GEMMS_IN_ONEDNN == (cpu.WIDE_GEMMS and vendor != "intel" and ONEDNN_LINEAR_OPS)


def test_half_precision_gemms_run_natively_only_with_avx512_bf16_or_fp16():
    """torch's bf16 / fp16 GEMM takes those GEMMs only where the CPU has bf16 dot products / fp16
    arithmetic (oneDNN emulates bf16 elsewhere, 3-4x slower than the fp32 GEMM on widened operands;
    torch's fp16 GEMM is a loop there, ~10x slower)."""
    flags = [line for line in open("/proc/cpuinfo")] if os.path.exists("/proc/cpuinfo") else []
    flags = next((line.split(":", 1)[1].split() for line in flags if line.startswith("flags")), None)
    if flags is not None:
        assert _C.cpu_has_avx512_bf16() == ("avx512_bf16" in flags)
        assert _C.cpu_has_avx512_fp16() == ("avx512_fp16" in flags)
    onednn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)()
    assert cpu.NATIVE_BF16_GEMM == (bool(onednn_bf16) and _C.cpu_has_avx512_bf16())
    onednn_fp16 = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)()
    assert cpu.NATIVE_FP16_GEMM == (bool(onednn_fp16) and _C.cpu_has_avx512_fp16())


@pytest.mark.parametrize("engine", ["onednn", "mkl"])
def test_onednn_follows_torch_backends_mkldnn_enabled(engine, generator, monkeypatch):
    """With torch.backends.mkldnn disabled, the oneDNN engine takes nothing (nor are weights
    expanded for it); MKL's wide GEMMs go on."""
    monkeypatch.setattr(cpu, "WIDE_GEMMS_IN_ONEDNN", engine == "onednn" and ONEDNN_LINEAR_OPS)
    calls = count_wide_gemms(monkeypatch)
    x, weight = randn(cpu.WIDE_GEMM_MIN_ROWS, 40, generator=generator), randn(67, 40, generator=generator)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    torch.testing.assert_close(cpu.linear(x, weight), eager.linear(x, weight), **LINEAR_TOL)
    assert len(calls) == int(cpu.WIDE_GEMMS and not cpu.WIDE_GEMMS_IN_ONEDNN)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    cpu.linear(x, weight)
    assert len(calls) == int(cpu.WIDE_GEMMS) * (1 + int(not cpu.WIDE_GEMMS_IN_ONEDNN))


def test_kernel_linear_names_a_wrong_x():
    weight = torch.zeros(5, 8)
    with pytest.raises(ValueError, match="fp32 x"):
        cpu.kernel_linear(torch.zeros(2, 8, dtype=torch.bfloat16), weight)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        cpu.kernel_linear(torch.zeros(2, 7), weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_products_of_many_rows(dtype, generator):
    """0 input or 0 output features at WIDE_GEMM_MIN_ROWS rows (oneDNN has no such primitive): zeros /
    an empty result, as eager gives."""
    got = cpu.linear(randn(cpu.WIDE_GEMM_MIN_ROWS, 0, generator=generator), torch.zeros(5, 0, dtype=dtype))
    assert got.shape == (cpu.WIDE_GEMM_MIN_ROWS, 5) and not got.any()
    got = cpu.linear(randn(cpu.WIDE_GEMM_MIN_ROWS, 7, generator=generator), torch.zeros(0, 7, dtype=dtype))
    assert got.shape == (cpu.WIDE_GEMM_MIN_ROWS, 0)


def test_float_linear_matches_eager(generator):
    x, weight = randn(3, 7, 40, generator=generator), randn(67, 40, generator=generator)
    residual = randn(3, 7, 67, generator=generator)
    torch.testing.assert_close(cpu.linear(x, weight, residual), eager.linear(x, weight, residual))


# ----------------------------------------------------------------------------------------------
# Argument checks: never a pointer to the wrong thing

def test_wrong_arguments_raise_naming_them(generator):
    q, k, v = attention_inputs(2, 3, 7, 33, 24, generator)
    table = randn(32, 3, generator=generator)
    kwargs = dict(bidirectional=True, num_buckets=32, max_distance=128)
    with pytest.raises(TypeError, match="q"):
        cpu.attention(q.numpy(), k, v, table, **kwargs)
    with pytest.raises(ValueError, match="k and v"):
        cpu.attention(q, k, v[:, :, :5], table, **kwargs)
    with pytest.raises(ValueError, match="bias_table"):
        cpu.attention(q, k, v, table[:, :2], **kwargs)
    with pytest.raises(ValueError, match="key_padding_mask"):
        cpu.attention(q, k, v, table, key_padding_mask=torch.ones(2, 5, dtype=torch.bool), **kwargs)
    with pytest.raises(ValueError, match="cache_length"):
        cpu.decode_attention(q[:, :, :1], k, v, 34, table, num_buckets=32, max_distance=128)
    with pytest.raises(ValueError, match="weight"):
        cpu.rms_norm(randn(3, 8, generator=generator), randn(9, generator=generator), 1e-6)
    with pytest.raises(ValueError, match="x.shape"):
        cpu.linear(randn(3, 8, generator=generator), QuantizedWeight.quantize(randn(4, 9, generator=generator)))
    with pytest.raises(TypeError, match="qweight"):
        cpu.linear(randn(3, 8, generator=generator),
                   QuantizedWeight(torch.zeros(4, 8, dtype=torch.int16), torch.ones(4)))


def test_bindings_refuse_unknown_element_kinds_naming_them():
    """The C++ bindings' element / kind arguments (set by umt5_fast's Python side) are checked before
    any pointer is read: an unknown value is a ValueError naming the argument, never a wrong cast."""
    with pytest.raises(ValueError, match="element must be"):
        _C.attention(q=0, q_strides=[0, 0, 0], k=0, k_strides=[0, 0, 0], v=0, v_strides=[0, 0, 0], out=0,
                     batch=1, heads=1, query_length=1, key_length=1, head_dim=1, bias_table=0,
                     distance_buckets=0, num_buckets=32,
                     max_distance=128, bidirectional=True, key_padding_mask=0, mask_batch_stride=0, causal=False,
                     query_offset=0, scale=1.0, num_threads=1, element="float64")
    with pytest.raises(ValueError, match="activations must be"):
        _C.DecoderStep(d_model=8, heads=2, d_kv=4, d_ff=16, num_buckets=8, max_distance=16, distance_buckets=1,
                       eps=1e-6, activation="gelu_tanh", layers=[], final_norm=0, activations="int8")
    with pytest.raises(ValueError, match="weight_kind must be"):
        _C.screen_row_norms(weight=0, weight_kind=2, qweight=0, scale=0, rows=1, cols=1, out=0, num_threads=1)
    with pytest.raises(ValueError, match="logits_kind"):
        _C.screen_argmax(x=0, rows=1, cols=1, screen_qweight=0, screen_scale=0, vocab=1, bound=0, bound2=0,
                         largest_norm=1.0, min_norm=0.0, head_kind=0, head=0, head_scale=0, logits_kind=2,
                         slack=0.0, slack_floor=0.0, forbidden=[], max_candidates=1, approx=0, out=0,
                         num_threads=1)


@pytest.mark.parametrize("rows,cols,k", [(1, 1, 1), (3, 7, 7), (4, 1000, 9), (64, 30011, 9), (2, 50, 1)])
def test_top_k_equals_torch_topk(rows, cols, k, generator):
    """Values and order as torch.topk; indices too where values are distinct; among equal values
    (rounded scores, -inf) the lower index first, each index a true position of its value."""
    distinct = torch.randn(rows, cols, generator=generator)
    values, indices = cpu.top_k(distinct, k)
    expected_values, expected_indices = torch.topk(distinct, k)
    assert torch.equal(values, expected_values) and torch.equal(indices, expected_indices)
    tied = distinct.round()
    tied[0, ::2] = -math.inf
    values, indices = cpu.top_k(tied, k)
    assert torch.equal(values, torch.topk(tied, k).values)
    assert torch.equal(tied.gather(1, indices), values)
    for row in range(rows):  # ties: ascending indices within each run of equal values
        for j in range(k - 1):
            if values[row, j] == values[row, j + 1]:
                assert indices[row, j] < indices[row, j + 1]
    assert len(set(indices[0].tolist())) == k
    strided = torch.randn(rows, cols + 3, generator=generator)[:, 1:1 + cols]
    assert torch.equal(cpu.top_k(strided, k)[1], torch.topk(strided, k)[1])
    if cols > 1:
        with_nan = distinct.clone()
        with_nan[-1, cols // 2] = math.nan  # torch's rule (NaN is the largest) through torch.topk
        nan_values, nan_indices = cpu.top_k(with_nan, k)
        torch.testing.assert_close(nan_values, torch.topk(with_nan, k).values, equal_nan=True)
        assert int(nan_indices[-1, 0]) == cols // 2


@pytest.mark.parametrize("rows,cols,k", [(1, 3, 1), (3, 7, 4), (5, 1000, 9), (64, 30011, 9)])
@pytest.mark.parametrize("spread", [1.0, 40.0])  # 40: most of exp(x - max) under e^-87
def test_log_softmax_top_k_is_log_softmax_then_ban_then_top_k(rows, cols, k, spread, generator):
    """Values within rounding of torch's log_softmax (its normaliser summed in other lanes: ulps of
    it), the same ids where the values are apart; banned ids still count in the normaliser and are
    never picked, even when they hold the maximum."""
    logits = torch.randn(rows, cols, generator=generator) * spread
    logits[0, ::3] = -math.inf
    banned = [0, cols - 1] if cols > k + 2 else []
    if banned and rows > 1:
        logits[1, cols - 1] = logits[1].max() + 5.0  # a banned id holds the maximum
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    log_probs[:, banned] = -math.inf
    expected_values, expected_indices = torch.topk(log_probs, k)
    values, indices = cpu.log_softmax_top_k(logits, k, banned)
    torch.testing.assert_close(values.double(), expected_values, rtol=1e-6, atol=4e-6)
    apart = (expected_values[:, :-1] - expected_values[:, 1:]).abs() > 1e-4
    assert torch.equal(indices[:, :-1][apart], expected_indices[:, :-1][apart])
    assert not any(i in banned for i in indices.flatten().tolist())
    strided = torch.randn(rows, cols + 2, generator=generator)[:, 1:1 + cols]
    torch.testing.assert_close(cpu.log_softmax_top_k(strided, k)[0],
                               torch.topk(torch.log_softmax(strided, -1), k).values, rtol=1e-6, atol=4e-6)


def test_log_softmax_top_k_leaves_nan_and_infinite_maxima_to_torch(generator):
    logits = torch.randn(3, 50, generator=generator)
    logits[1, 7] = math.nan
    logits[2, 9] = math.inf
    values, indices = cpu.log_softmax_top_k(logits, 4, [3])
    expected = torch.log_softmax(logits, dim=-1)
    expected[:, 3] = -math.inf
    expected_values, expected_indices = torch.topk(expected, 4)  # (NaN rows: torch's choice)
    torch.testing.assert_close(values, expected_values, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(indices, expected_indices)
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        cpu.log_softmax_top_k(logits[0], 4)
    assert cpu.log_softmax_top_k(logits.double(), 2)[0].dtype == torch.float64  # eager's


def flush_to_zero_is_on() -> bool:
    """The calling thread's flush-to-zero mode, read by setting it back to what it was."""
    was_on = _C.set_flush_to_zero(on=False, num_threads=1)
    _C.set_flush_to_zero(on=was_on, num_threads=1)
    return was_on


@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 7), (64, 30011)])
@pytest.mark.parametrize("spread", [1.0, 40.0])  # 40: most of exp(x - max) subnormal
def test_log_softmax_is_torch_bit_for_bit(rows, cols, spread, generator):
    scores = torch.randn(rows, cols, generator=generator) * spread
    scores[0, ::5] = -math.inf
    if rows > 1:
        scores[1, 1] = 1e-40  # a subnormal score
    expected = torch.log_softmax(scores, dim=-1).view(torch.int32)  # bits (a row of -inf only: NaN)
    assert not flush_to_zero_is_on()
    assert torch.equal(cpu.log_softmax(scores).view(torch.int32), expected)
    out = torch.empty_like(scores)
    assert cpu.log_softmax(scores, out=out) is out and torch.equal(out.view(torch.int32), expected)
    assert not flush_to_zero_is_on()  # the caller's mode is back


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86's MXCSR")
def test_flush_to_zero_reaches_the_threads_torch_runs_on():
    """The mode is per thread: set_flush_to_zero sets it in an OpenMP team, which must be the pool
    torch's parallel ops run on (the extension shares torch's OpenMP runtime)."""
    tiny = torch.full((1 << 22,), 1e-30)  # times 1e-10: subnormal products
    threads = torch.get_num_threads()
    assert bool((tiny * 1e-10 > 0).all())
    was_on = _C.set_flush_to_zero(on=True, num_threads=threads)
    try:
        assert not bool((tiny * 1e-10).any())  # every thread's share flushed
    finally:
        _C.set_flush_to_zero(on=was_on, num_threads=threads)
    assert bool((tiny * 1e-10 > 0).all())


@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 1001), (3, 7), (16, 5000)])
def test_argmax_equals_torch_with_ties_inf_and_nan(rows, cols, generator):
    scores = torch.randn(rows, cols, generator=generator).round()  # integers: many ties
    scores[0, ::3] = -math.inf
    if rows > 1:
        scores[1, cols // 2:] = math.nan  # NaN counts as the maximum: the first one wins
        scores[-1] = -math.inf  # every token banned: index 0
    assert torch.equal(cpu.argmax(scores), scores.argmax(-1))
    wide = torch.randn(rows, cols + 5, generator=generator)[:, 2:2 + cols]  # strided rows
    assert torch.equal(cpu.argmax(wide), wide.argmax(-1))
    with pytest.raises(ValueError, match="scores must have 2 dimensions"):
        cpu.argmax(scores[0])


# ----------------------------------------------------------------------------------------------
# NaN in, NaN out: a corrupt weight or input must not turn into a plausible finite result (the
# clamps inside exp, padding masks and relu are max/min operations, which may drop a NaN).

@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False])
def test_nan_propagates_through_activations(activation, dtype, gated, generator):
    x = randn(3, 40, generator=generator)
    x[1, 5] = float("nan")
    w = randn(50, 40, generator=generator).to(dtype)
    got = cpu.gated_ffn_in(x.to(dtype), w, w if gated else None, activation)
    assert torch.equal(got.isnan(), eager.gated_ffn_in(x.to(dtype), w, w if gated else None, activation).isnan())
    assert got[1].isnan().all() and not got[[0, 2]].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_propagates_through_attention(dtype, causal, generator):
    q, k, v = attention_inputs(2, 3, 9, 9, 8, generator)
    q[0, 1, 4, 2] = float("nan")
    v[1, 2, 3, 0] = float("nan")
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, -3:] = False
    kwargs = dict(bidirectional=not causal, causal=causal, num_buckets=8, max_distance=16, key_padding_mask=mask)
    table = randn(8, 3, generator=generator)
    got = cpu.attention(q.to(dtype), k.to(dtype), v.to(dtype), table, **kwargs)
    expected = eager.attention(q.to(dtype), k.to(dtype), v.to(dtype), table, **kwargs)
    assert got.isnan().any() and torch.equal(got.isnan(), expected.isnan())
    cache = dict(bias_table=table, num_buckets=8, max_distance=16, key_padding_mask=mask)
    got = cpu.decode_attention(q[:, :, 4:5], k, v, 9, **cache)
    assert torch.equal(got.isnan(), eager.decode_attention(q[:, :, 4:5], k, v, 9, **cache).isnan())


# ----------------------------------------------------------------------------------------------
# Arguments the kernels must not misread

def test_non_contiguous_weights_are_read_correctly(generator):
    """Weights whose contiguous copy is made for the call (a transposed view): the copy must live
    until the kernel has read it."""
    x = randn(5, 512, generator=generator)
    weight = randn(512, 300, generator=generator).t() * 512 ** -0.5  # outputs O(1), as in a model
    assert not weight.is_contiguous()
    torch.testing.assert_close(cpu.linear(x, weight), eager.linear(x, weight), **LINEAR_TOL)
    torch.testing.assert_close(cpu.linear(x, weight.bfloat16()), eager.linear(x, weight.bfloat16()),
                               **LINEAR_TOL)
    int8 = QuantizedWeight.quantize(weight)
    strided = QuantizedWeight(int8.qweight.t().contiguous().t(), int8.scale)
    assert not strided.qweight.is_contiguous()
    torch.testing.assert_close(cpu.linear(x, strided), eager.linear(x, int8), **LINEAR_TOL)
    norm_weight = randn(2, 65536, generator=generator)[:, 0]
    assert not norm_weight.is_contiguous() and norm_weight.numel() == 2
    rows = randn(3, 2, generator=generator)
    torch.testing.assert_close(cpu.rms_norm(rows, norm_weight, 1e-6), eager.rms_norm(rows, norm_weight, 1e-6),
                               **POINTWISE_TOL)
    wide = randn(65536, 2, generator=generator)[:, 1]
    rows = randn(2, 65536, generator=generator)
    torch.testing.assert_close(cpu.rms_norm(rows, wide, 1e-6), eager.rms_norm(rows, wide, 1e-6), **POINTWISE_TOL)
    hidden, normed = cpu.add_rms_norm(rows, rows, wide, 1e-6)
    torch.testing.assert_close(normed, eager.rms_norm(rows + rows, wide, 1e-6), **POINTWISE_TOL)


@pytest.mark.parametrize("weights", ["int8", "bf16", "fp32"])
def test_weight_only_linear_bits_do_not_depend_on_threads(weights, generator):
    """Each thread takes a different block of columns: the sums must not round differently there."""
    x = randn(40, 600, generator=generator)
    w = randn(257, 600, generator=generator)
    weight = {"int8": QuantizedWeight.quantize(w), "bf16": w.bfloat16(), "fp32": w}[weights]
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(torch.cat([cpu.linear(x[:rows], weight) for rows in (1, 2, 6, 40)]))  # 40: panels
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_bad_kernel_arguments_get_clear_errors(generator):
    q, k, v = attention_inputs(1, 2, 3, 4, 8, generator)
    with pytest.raises(TypeError, match="one dtype"):
        cpu.attention(q, k.double(), v, None, bidirectional=True, num_buckets=32, max_distance=128)
    with pytest.raises(TypeError, match="cache_length must be an integer"):
        cpu.decode_attention(q[:, :, :1], k, v, 2.7, None, num_buckets=32, max_distance=128)
    with pytest.raises(ValueError, match="unknown activation 'gelu_fast2'"):
        cpu.gated_ffn_in(randn(2, 8, generator=generator), randn(4, 8, generator=generator), None, "gelu_fast2")
    with pytest.raises(ValueError, match="residual .* does not broadcast"):
        cpu.linear(randn(2, 8, generator=generator), randn(4, 8, generator=generator), randn(3, 4, generator=generator))
    assert torch.equal(cpu.linear(torch.ones(2, 0), torch.ones(7, 0)), torch.zeros(2, 7))
    with pytest.raises(ValueError, match="non-empty 2-D float weight"):
        QuantizedWeight.quantize(torch.ones(7, 0))
