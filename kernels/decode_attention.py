"""One decoder step of UMT5 self-attention against the static KV cache (flash-decoding).

Each (batch, head) has one query row, at position ``cache_length - 1``, attending to the first
``cache_length`` keys of a ``[B, H, S_max, D]`` cache. A step reads the whole visible cache once
and does two flops per byte, so the kernel is bound by memory bandwidth and must keep every SM
streaming: ``B * H`` rows are too few for long caches, so the keys are split into ``num_splits``
chunks, each program producing a partial (running max, sum, unnormalised output) that a second
small kernel merges. With one split the first kernel writes the output itself.

``cache_length`` may be a 0-d device tensor, read inside the kernel, so a captured CUDA graph
replays every step unchanged; the launch grid depends only on ``S_max``. The chunk size is
derived from the length in-kernel, so all splits share the work whatever the length.
"""
import functools

import torch
import triton
import triton.language as tl

from umt5_fast.kernels import interpreted
from umt5_fast.kernels.attention import MAX_HEAD_DIM, masked_scores_log2, online_softmax_step
from umt5_fast.kernels.bucket import relative_position_bias

# Keys each program streams per iteration; memory-bound, so larger blocks only add registers.
_BLOCK_N = 16 if interpreted() else 64
# A split shorter than this spends more time merging than streaming.
_MIN_KEYS_PER_SPLIT = 256


@triton.jit(do_not_specialize=["cache_length"])
def _decode_attention_split_kernel(
        q_ptr, k_ptr, v_ptr, cache_length, table_ptr, key_mask_ptr, out_ptr, partial_max_ptr, partial_sum_ptr,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_table_bucket, stride_table_head, stride_mask_b, stride_mask_n, stride_ob, stride_oh, num_heads,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_BUCKETS: tl.constexpr,
        MAX_DISTANCE: tl.constexpr, HAS_KEY_MASK: tl.constexpr, LENGTH_IN_MEMORY: tl.constexpr,
        NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    batch_head = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads

    if LENGTH_IN_MEMORY:
        length = tl.load(cache_length).to(tl.int32)
    else:
        length = cache_length
    query_position = length - 1
    keys_per_split = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, length)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    head_dim_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + batch * stride_qb + head * stride_qh + offs_d, mask=head_dim_mask, other=0.0).to(tl.float32)
    k_ptrs = k_ptr + batch * stride_kb + head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_ptr + batch * stride_vb + head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    table_ptr += head * stride_table_head
    key_mask_ptrs = key_mask_ptr + batch * stride_mask_b + offs_n * stride_mask_n

    m_i = tl.full([], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM_PADDED], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        key_position = start_n + offs_n
        key_exists = key_position < end
        kv_mask = key_exists[:, None] & head_dim_mask[None, :]
        k = tl.load(k_ptrs + start_n * stride_kn, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[None, :] * k, axis=1)
        if HAS_BIAS:
            scores += relative_position_bias(table_ptr, stride_table_bucket, key_position - query_position,
                                             False, NUM_BUCKETS, MAX_DISTANCE)
        key_kept = key_exists
        if HAS_KEY_MASK:
            key_kept = tl.load(key_mask_ptrs + start_n * stride_mask_n, mask=key_exists, other=0) != 0
        m_i, l_i, alpha, p = online_softmax_step(m_i, l_i, masked_scores_log2(scores, key_kept, key_exists))
        v = tl.load(v_ptrs + start_n * stride_vn, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)

    if NUM_SPLITS == 1:
        tl.store(out_ptr + batch * stride_ob + head * stride_oh + offs_d, (acc / l_i).to(out_ptr.dtype.element_ty),
                 mask=head_dim_mask)
    else:
        # An empty split (start >= length) leaves max -inf and sum 0: the merge gives it weight 0.
        partial = batch_head * NUM_SPLITS + split
        tl.store(partial_max_ptr + partial, m_i)
        tl.store(partial_sum_ptr + partial, l_i)
        tl.store(out_ptr + partial * HEAD_DIM_PADDED + offs_d, acc)


@triton.jit
def _decode_attention_merge_kernel(partial_out_ptr, partial_max_ptr, partial_sum_ptr, out_ptr, stride_ob, stride_oh,
                                   num_heads, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
                                   NUM_SPLITS: tl.constexpr):
    batch_head = tl.program_id(0).to(tl.int64)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    partial = batch_head * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)

    split_max = tl.load(partial_max_ptr + partial)
    weight = tl.math.exp2(split_max - tl.max(split_max, axis=0))
    total = tl.sum(tl.load(partial_sum_ptr + partial) * weight, axis=0)
    acc = tl.sum(tl.load(partial_out_ptr + partial[:, None] * HEAD_DIM_PADDED + offs_d[None, :]) * weight[:, None],
                 axis=0)
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + offs_d, (acc / total).to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def default_num_splits(batch_heads: int, max_length: int, device: torch.device) -> int:
    """Splits per (batch, head) row: enough programs for two waves over the SMs, each split at least
    ``_MIN_KEYS_PER_SPLIT`` keys of the longest possible cache, a power of two (the merge's width)."""
    splits = min(triton.cdiv(2 * _sm_count(device), batch_heads), triton.cdiv(max_length, _MIN_KEYS_PER_SPLIT))
    return 1 << (max(splits, 1).bit_length() - 1)


def decode_attention(q, k_cache, v_cache, cache_length, bias_table, *, num_buckets, max_distance,
                     key_padding_mask=None, num_splits=None, out=None):
    """The ops-contract ``decode_attention``: ``q`` ``[B, H, 1, D]``, caches ``[B, H, S_max, D]`` (any
    strides, last dim contiguous), ``cache_length`` a python int or 0-d int tensor on the device,
    ``bias_table`` ``[num_buckets, H]`` or None, ``key_padding_mask`` ``[B, >= cache_length]``.
    Returns ``out`` ``[B, 1, H, D]`` (written if given). ``num_splits`` (a power of two) overrides
    ``default_num_splits``.
    """
    batch, num_heads, _, head_dim = q.shape
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} exceeds the kernel's maximum {MAX_HEAD_DIM}")
    head_dim_padded = max(16, triton.next_power_of_2(head_dim))
    if num_splits is None:
        num_splits = default_num_splits(batch * num_heads, k_cache.shape[2], q.device)
    if num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two; got {num_splits}")
    if out is None:
        out = torch.empty(batch, 1, num_heads, head_dim, dtype=q.dtype, device=q.device)

    if bias_table is None:
        table, stride_table_bucket, stride_table_head = q, 0, 0  # never read
    else:
        table, (stride_table_bucket, stride_table_head) = bias_table, bias_table.stride()
    if key_padding_mask is None:
        key_mask, stride_mask_b, stride_mask_n = q, 0, 0  # never read
    else:
        key_mask = key_padding_mask.to(torch.bool).view(torch.uint8)
        stride_mask_b, stride_mask_n = key_mask.stride()
    if num_splits == 1:
        split_out, partial_max, partial_sum = out, None, None
    else:
        split_out = torch.empty(batch * num_heads * num_splits, head_dim_padded, dtype=torch.float32, device=q.device)
        partial_max = torch.empty(batch * num_heads * num_splits, dtype=torch.float32, device=q.device)
        partial_sum = torch.empty_like(partial_max)

    _decode_attention_split_kernel[(batch * num_heads, num_splits)](
        q, k_cache, v_cache, cache_length, table, key_mask, split_out, partial_max, partial_sum,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        stride_table_bucket, stride_table_head, stride_mask_b, stride_mask_n, out.stride(0), out.stride(2), num_heads,
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded, HAS_BIAS=bias_table is not None,
        NUM_BUCKETS=num_buckets, MAX_DISTANCE=max_distance, HAS_KEY_MASK=key_padding_mask is not None,
        LENGTH_IN_MEMORY=isinstance(cache_length, torch.Tensor), NUM_SPLITS=num_splits, BLOCK_N=_BLOCK_N)
    if num_splits > 1:
        _decode_attention_merge_kernel[(batch * num_heads,)](
            split_out, partial_max, partial_sum, out, out.stride(0), out.stride(2), num_heads,
            HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded, NUM_SPLITS=num_splits)
    return out
