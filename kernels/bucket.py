"""T5 relative-position buckets inside Triton kernels, bit-exact with ``umt5_fast.buckets``.

The torch definition takes ``log(distance.float() / max_exact) / math.log(max_distance / max_exact)``
in float32 (the python double divisor is rounded to float32 by type promotion), multiplies by the
number of log-spaced buckets in float32 and truncates toward zero. The jit function below performs
the same float32 operations with IEEE rounding: ``tl.math.div_rn`` because plain ``/`` on float32
compiles to the approximate ``div.full.f32`` on NVIDIA GPUs, and ``tl.log`` (libdevice ``logf``).
The truncation matters at the ratios that are exact powers (e.g. distance 16 with 32 buckets
and max_distance 128 lands exactly on 2.0); ``tests/kernels/test_bucket.py`` holds the kernel equal
to torch and transformers over every relative position in [-8192, 8192].
"""
import math

import torch
import triton
import triton.language as tl


@triton.constexpr_function
def _log_span(max_distance, max_exact):
    """``math.log(max_distance / max_exact)`` as a python double; dividing a float32 tensor by it
    makes Triton round it to a float32 constant (to nearest), as torch's type promotion does."""
    return math.log(max_distance / max_exact)


@triton.jit
def relative_position_bucket(relative_position, bidirectional: tl.constexpr, num_buckets: tl.constexpr,
                             max_distance: tl.constexpr):
    """Bucket (int32) of ``relative_position = key_pos - query_pos`` (an int32 tensor of any shape)."""
    if bidirectional:
        # Half the buckets for keys before the query, half for keys after it.
        direction_buckets: tl.constexpr = num_buckets // 2
        bucket_base = tl.where(relative_position > 0, direction_buckets, 0)
        distance = tl.abs(relative_position)
    else:
        direction_buckets: tl.constexpr = num_buckets
        bucket_base = tl.zeros_like(relative_position)
        distance = tl.maximum(-relative_position, 0)
    max_exact: tl.constexpr = direction_buckets // 2
    # Clamping below at max_exact keeps log() finite; smaller distances take the exact branch anyway.
    ratio = tl.math.div_rn(tl.maximum(distance, max_exact).to(tl.float32), max_exact)
    log_ratio = tl.math.div_rn(tl.log(ratio), _log_span(max_distance, max_exact))
    log_bucket = max_exact + (log_ratio * (direction_buckets - max_exact)).to(tl.int32)
    log_bucket = tl.minimum(log_bucket, direction_buckets - 1)
    return bucket_base + tl.where(distance < max_exact, distance, log_bucket)


@triton.jit
def relative_position_bias(table_ptr, stride_bucket, relative_position, bidirectional: tl.constexpr,
                           num_buckets: tl.constexpr, max_distance: tl.constexpr):
    """``table[bucket(relative_position)]`` as float32, ``table_ptr`` pointing at one head's column.

    The bucket is clamped into ``[0, num_buckets)`` so that the gather needs no mask. Callers also
    evaluate lanes past the sequence (a tile's tail), and a config whose max_distance is not above
    its exact buckets gives those far distances no defined bucket (negative ones, as transformers'
    formula does; ``umt5_fast.buckets.check_distance`` refuses such inputs): those lanes' values are
    discarded, but their loads must stay inside the table. The table is a few hundred bytes and
    stays in L1.
    """
    bucket = relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance)
    bucket = tl.minimum(tl.maximum(bucket, 0), num_buckets - 1)
    return tl.load(table_ptr + bucket * stride_bucket).to(tl.float32)


@triton.jit
def _bucket_table_kernel(relative_position_ptr, bucket_ptr, numel, bidirectional: tl.constexpr,
                         num_buckets: tl.constexpr, max_distance: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < numel
    relative_position = tl.load(relative_position_ptr + offsets, mask=in_range, other=0)
    bucket = relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance)
    tl.store(bucket_ptr + offsets, bucket, mask=in_range)


def bucket_table(relative_positions: torch.Tensor, bidirectional: bool, num_buckets: int,
                 max_distance: int) -> torch.Tensor:
    """Buckets (int32, same shape) of an integer tensor of relative positions, computed in-kernel.

    A test harness for ``relative_position_bucket``: the attention kernels call the jit function
    directly on their tiles.
    """
    flat = relative_positions.reshape(-1).to(torch.int32).contiguous()
    buckets = torch.empty_like(flat)
    block = 1024
    _bucket_table_kernel[(triton.cdiv(flat.numel(), block),)](
        flat, buckets, flat.numel(), bidirectional, num_buckets, max_distance, BLOCK=block)
    return buckets.reshape(relative_positions.shape)
