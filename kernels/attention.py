"""UMT5 attention forward, FlashAttention-2 style, with the relative-position bias made in-kernel.

One program owns ``BLOCK_M`` query rows of one (batch, head) and streams the keys in blocks of
``BLOCK_N``: scores ``scale * q.k + bias`` -> masks -> online softmax in fp32 with ``exp2`` ->
``p @ v`` accumulated in fp32. No ``[B, H, Lq, Lk]`` tensor exists; the bias comes from the
layer's ``[num_buckets, H]`` table in one of two ways (``bias_mode``):

* ``"bucket"``: each score tile computes its buckets with ``kernels.bucket`` and gathers from the
  table (no extra memory, one ``log`` per score);
* ``"distance"``: a small kernel first writes the bias of every distance, ``[H, Lq + Lk - 1]``
  (O(H * L) memory), and the tiles gather from it by ``j - i`` (no transcendental per score).

Masked keys (padding, or causal future) score the finite ``MASKED_SCORE``, so a row whose keys are
all masked averages V uniformly, like transformers. In causal mode a query block skips key blocks
entirely in its future: they add exactly zero unless a row has every visible key masked, in
which case the kernel goes on over the skipped blocks to average all keys as the reference does.
"""
import torch
import triton
import triton.language as tl

from umt5_fast.kernels import SHARED_MEMORY_BUDGET, input_precision, launch_configs
from umt5_fast.kernels.bucket import relative_position_bias
from umt5_fast.ops import MASKED_SCORE

BIAS_MODES = ("bucket", "distance")
MAX_HEAD_DIM = 128

_LOG2E = tl.constexpr(1.4426950408889634)
_MASKED_SCORE = tl.constexpr(MASKED_SCORE)
# A running max below this (log2 units) means every key seen so far was masked: real scores are
# nowhere near -5e29.
_ALL_MASKED_BELOW = tl.constexpr(0.5 * MASKED_SCORE * _LOG2E.value)


@triton.jit
def online_softmax_step(m_i, l_i, scores_log2):
    """Fold a block of scores (log2 units, keys on the last axis) into the running max and sum.

    Returns ``(m_new, l_new, alpha, p)``: the accumulator is to be scaled by ``alpha`` (one per
    row) before adding ``p @ v``. Shared by the prefill and decode kernels.
    """
    m_new = tl.maximum(m_i, tl.max(scores_log2, axis=-1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(scores_log2 - tl.expand_dims(m_new, -1))
    return m_new, l_i * alpha + tl.sum(p, axis=-1), alpha, p


@triton.jit
def masked_scores_log2(scores, key_kept, key_exists):
    """Scores in log2 units for ``exp2``: ``MASKED_SCORE`` where a key is masked, -inf where the key
    does not exist (block tails past the key length), so only real keys enter the softmax."""
    scores = tl.where(key_kept, scores, _MASKED_SCORE)
    return tl.where(key_exists, scores, float("-inf")) * _LOG2E


@triton.jit
def _attend_key_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, bias_ptr, stride_bias,
                       key_mask_ptrs, stride_mask_n, offs_m, offs_d, head_dim_mask,
                       start, end, query_length, key_length, query_offset, scale,
                       BIAS_MODE: tl.constexpr, BIDIRECTIONAL: tl.constexpr, NUM_BUCKETS: tl.constexpr,
                       MAX_DISTANCE: tl.constexpr, HAS_KEY_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax over the key blocks starting at ``start`` (a block boundary) up to ``end``."""
    query_position = offs_m + query_offset
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_exists = offs_n < key_length
        kv_mask = key_exists[:, None] & head_dim_mask[None, :]
        k = tl.load(k_ptrs + start_n * stride_kn, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale
        if BIAS_MODE == "bucket":
            relative_position = offs_n[None, :] - query_position[:, None]
            scores += relative_position_bias(bias_ptr, stride_bias, relative_position, BIDIRECTIONAL,
                                             NUM_BUCKETS, MAX_DISTANCE)
        elif BIAS_MODE == "distance":
            # Distance vector index of (i, j) is j - i + Lq - 1; rows/keys past the ends have none.
            distance_index = offs_n[None, :] - offs_m[:, None] + (query_length - 1)
            scores += tl.load(bias_ptr + distance_index * stride_bias,
                              mask=(offs_m[:, None] < query_length) & key_exists[None, :], other=0.0).to(tl.float32)
        key_kept = key_exists[None, :]
        if HAS_KEY_MASK:
            key_kept = key_kept & (tl.load(key_mask_ptrs + start_n * stride_mask_n, mask=key_exists,
                                           other=0) != 0)[None, :]
        if IS_CAUSAL:
            key_kept = key_kept & (offs_n[None, :] <= query_position[:, None])
        m_i, l_i, alpha, p = online_softmax_step(m_i, l_i,
                                                 masked_scores_log2(scores, key_kept, key_exists[None, :]))
        v = tl.load(v_ptrs + start_n * stride_vn, mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
    return acc, l_i, m_i


_ATTENTION_CONFIGS = launch_configs(
    tuned=[triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
           for block_m, block_n, warps, stages in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2),
                                                   (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 4), (64, 32, 4, 4)]],
    # Fits shared memory for every dtype and head size (fp32 with 128-wide heads needs 131 KB).
    default=triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    # BLOCK_M != BLOCK_N so the tests exercise query and key blocks that do not line up.
    interpreter=triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1))


def _prune_configs(configs, named_args, **kwargs):
    head_dim, element_size = kwargs["HEAD_DIM_PADDED"], named_args["q_ptr"].element_size()

    def fits(config):
        block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        # With 128-wide heads a [128, 128] score tile and the accumulator spill registers.
        if head_dim > 64 and block_m * block_n >= 128 * 128:
            return False
        # The q tile plus num_stages K and V tiles in shared memory (fp32 128-wide heads overflow).
        return element_size * head_dim * (block_m + 2 * block_n * config.num_stages) <= SHARED_MEMORY_BUDGET

    return [c for c in configs if fits(c)] or configs


# Sequence lengths stay out of the key: one tuning per head size and mode, not one per length.
@triton.autotune(configs=_ATTENTION_CONFIGS, key=["HEAD_DIM_PADDED", "BIAS_MODE", "IS_CAUSAL"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _attention_forward_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, key_mask_ptr, out_ptr,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_bias_head, stride_bias, stride_mask_b, stride_mask_n, stride_ob, stride_om, stride_oh,
        num_heads, query_length, key_length, query_offset, scale,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, BIAS_MODE: tl.constexpr,
        BIDIRECTIONAL: tl.constexpr, NUM_BUCKETS: tl.constexpr, MAX_DISTANCE: tl.constexpr,
        HAS_KEY_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    batch_head = tl.program_id(1).to(tl.int64)
    batch = batch_head // num_heads
    head = batch_head % num_heads

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    head_dim_mask = offs_d < HEAD_DIM  # head dims like 24 or 80 are padded to a power of two
    query_rows = offs_m < query_length

    q = tl.load(q_ptr + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=query_rows[:, None] & head_dim_mask[None, :], other=0.0)
    k_ptrs = k_ptr + batch * stride_kb + head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_ptr + batch * stride_vb + head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    bias_ptr += head * stride_bias_head
    key_mask_ptrs = key_mask_ptr + batch * stride_mask_b + offs_n * stride_mask_n

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)

    if IS_CAUSAL:
        # Keys after the block's last query position are masked for every row of the block.
        visible_end = tl.minimum(key_length, (start_m + 1) * BLOCK_M + query_offset)
    else:
        visible_end = key_length
    acc, l_i, m_i = _attend_key_blocks(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, bias_ptr, stride_bias, key_mask_ptrs,
        stride_mask_n, offs_m, offs_d, head_dim_mask, 0, visible_end, query_length, key_length, query_offset,
        scale, BIAS_MODE, BIDIRECTIONAL, NUM_BUCKETS, MAX_DISTANCE, HAS_KEY_MASK, IS_CAUSAL, INPUT_PRECISION,
        BLOCK_N)
    if IS_CAUSAL and HAS_KEY_MASK:
        # A row whose visible keys are all padding ties every key at MASKED_SCORE, the skipped
        # future ones included; visit them too so it averages all of V like the reference.
        fully_masked = query_rows & (m_i < _ALL_MASKED_BELOW)
        skipped_start = tl.cdiv(visible_end, BLOCK_N) * BLOCK_N
        skipped_end = tl.where(tl.max(fully_masked.to(tl.int32)) > 0, key_length, skipped_start)
        acc, l_i, m_i = _attend_key_blocks(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, bias_ptr, stride_bias, key_mask_ptrs,
            stride_mask_n, offs_m, offs_d, head_dim_mask, skipped_start, skipped_end, query_length, key_length,
            query_offset, scale, BIAS_MODE, BIDIRECTIONAL, NUM_BUCKETS, MAX_DISTANCE, HAS_KEY_MASK, IS_CAUSAL,
            INPUT_PRECISION, BLOCK_N)

    out = acc / l_i[:, None]
    out_ptrs = out_ptr + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=query_rows[:, None] & head_dim_mask[None, :])


@triton.jit
def _bias_by_distance_kernel(table_ptr, out_ptr, stride_table_bucket, stride_table_head, stride_out_head,
                             num_distances, first_relative_position, BIDIRECTIONAL: tl.constexpr,
                             NUM_BUCKETS: tl.constexpr, MAX_DISTANCE: tl.constexpr, BLOCK: tl.constexpr):
    head = tl.program_id(1).to(tl.int64)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    bias = relative_position_bias(table_ptr + head * stride_table_head, stride_table_bucket,
                                  first_relative_position + offsets, BIDIRECTIONAL, NUM_BUCKETS, MAX_DISTANCE)
    tl.store(out_ptr + head * stride_out_head + offsets, bias.to(out_ptr.dtype.element_ty), mask=offsets < num_distances)


def bias_by_distance(bias_table, query_length, key_length, query_offset, *, bidirectional, num_buckets,
                     max_distance):
    """``[H, Lq + Lk - 1]``: entry ``d`` is the bias of relative position ``d - (Lq - 1 + query_offset)``,
    i.e. of (query i, key j) at ``d = j - i + Lq - 1``. Table entries copied exactly, in the table's
    dtype (half the bytes for the attention tiles to gather in fp16/bf16 models)."""
    num_heads = bias_table.shape[1]
    num_distances = query_length + key_length - 1
    out = torch.empty(num_heads, num_distances, dtype=bias_table.dtype, device=bias_table.device)
    block = 256
    _bias_by_distance_kernel[(triton.cdiv(num_distances, block), num_heads)](
        bias_table, out, bias_table.stride(0), bias_table.stride(1), out.stride(0), num_distances,
        -(query_length - 1 + query_offset), bidirectional, num_buckets, max_distance, BLOCK=block)
    return out


def attention(q, k, v, bias_table, *, bidirectional, num_buckets, max_distance, key_padding_mask=None,
              causal=False, query_offset=0, scale=1.0, bias_mode="distance", out=None):
    """The ops-contract ``attention`` (``q`` ``[B, H, Lq, D]``, ``k``/``v`` ``[B, H, Lk, D]``, any strides
    with the last dim contiguous; ``out`` ``[B, Lq, H, D]`` contiguous, written if given).

    ``bias_mode`` picks how the bias reaches the tiles (see the module docstring); it is ignored
    when ``bias_table`` is None. Head dims up to ``MAX_HEAD_DIM``.
    """
    batch, num_heads, query_length, head_dim = q.shape
    key_length = k.shape[2]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} exceeds the kernel's maximum {MAX_HEAD_DIM}")
    if out is None:
        out = torch.empty(batch, query_length, num_heads, head_dim, dtype=q.dtype, device=q.device)

    if bias_mode not in BIAS_MODES:
        raise ValueError(f"bias_mode must be one of {BIAS_MODES}; got {bias_mode!r}")
    if bias_table is None:
        bias_mode, bias, stride_bias_head, stride_bias = "none", q, 0, 0  # bias_ptr is never read
    elif bias_mode == "bucket":
        bias, stride_bias_head, stride_bias = bias_table, bias_table.stride(1), bias_table.stride(0)
    else:
        bias = bias_by_distance(bias_table, query_length, key_length, query_offset, bidirectional=bidirectional,
                                num_buckets=num_buckets, max_distance=max_distance)
        stride_bias_head, stride_bias = bias.stride(0), bias.stride(1)

    if key_padding_mask is None:
        key_mask, stride_mask_b, stride_mask_n = q, 0, 0  # never read
    else:
        key_mask = key_padding_mask.to(torch.bool).view(torch.uint8)
        stride_mask_b, stride_mask_n = key_mask.stride()

    grid = lambda meta: (triton.cdiv(query_length, meta["BLOCK_M"]), batch * num_heads)  # noqa: E731
    _attention_forward_kernel[grid](
        q, k, v, bias, key_mask, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), stride_bias_head, stride_bias, stride_mask_b, stride_mask_n,
        out.stride(0), out.stride(1), out.stride(2),
        num_heads, query_length, key_length, query_offset, float(scale),
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=max(16, triton.next_power_of_2(head_dim)), BIAS_MODE=bias_mode,
        BIDIRECTIONAL=bidirectional, NUM_BUCKETS=num_buckets, MAX_DISTANCE=max_distance,
        HAS_KEY_MASK=key_padding_mask is not None, IS_CAUSAL=causal,
        INPUT_PRECISION=input_precision(q.dtype))
    return out
