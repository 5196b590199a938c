"""T5 relative-position buckets: the single definition every backend mirrors.

UMT5 gives each self-attention layer its own table ``relative_attention_bias`` of shape
``[num_buckets, num_heads]``. The bias added to the score of (query i, key j) is
``table[bucket(j - i), h]``. Half the buckets (all of them in causal mode) hold exact small
distances; the rest cover distances up to ``max_distance`` on a log scale, and everything
further away shares the last bucket.

The Triton kernel (``umt5_fast.kernels.bucket``) computes the same integer with the same float32
operations; the C++ kernels (``csrc/bucket.h``) look the log-scale buckets up in
``distance_buckets``, computed here, since a log of their own rounds differently from torch's.
``tests/kernels/test_bucket.py`` and ``tests/test_cpu_kernels.py`` hold them equal over every position.
"""
import functools
import math

import torch


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket of ``relative_position = key_pos - query_pos`` (an integer tensor), as in T5.

    Same arithmetic as transformers' ``UMT5Attention._relative_position_bucket``: the log is taken
    in float32 and truncated toward zero.
    """
    relative_buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    log_ratio = torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
    relative_position_if_large = max_exact + (log_ratio * (num_buckets - max_exact)).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1))
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


# Distances the C++ kernels' bucket table covers (512 KiB): check_distance refuses longer ones where
# max_distance is larger still.
MAX_TABLE_DISTANCE = 1 << 17


@functools.lru_cache(maxsize=32)
def distance_buckets(num_buckets: int, max_distance: int, bidirectional: bool) -> torch.Tensor:
    """int32 ``[min(max_distance, MAX_TABLE_DISTANCE)]`` (CPU): entry d is the bucket of relative
    position -d, the table the C++ kernels read (csrc/bucket.h). torch's float32 log is not
    correctly rounded (~5% of values are 1 ulp from libm's), so a C++ log truncated to other buckets
    where the ratio of logs falls on a boundary (distance 15 with 19 buckets and max distance 25:
    log(15/9) / log(25/9) = 1/2). Read-only: shared by every caller with these arguments."""
    distances = torch.arange(min(max(max_distance, 0), MAX_TABLE_DISTANCE), dtype=torch.long)
    return relative_position_bucket(-distances, bidirectional, num_buckets, max_distance).to(torch.int32)


def exact_bucket_count(num_buckets: int, bidirectional: bool) -> int:
    """``max_exact``: the buckets holding one distance each, per direction (the rest are log-scale)."""
    return (num_buckets // 2 if bidirectional else num_buckets) // 2


def longest_defined_distance(num_buckets: int, max_distance: int, bidirectional: bool):
    """The longest distance whose bucket is defined, or None when every distance's is.

    The log-scale buckets span ``(max_exact, max_distance)``. A config whose ``max_distance`` is not
    above ``max_exact`` leaves that span empty or reversed: the formula divides by ``log(1) = 0``
    (undefined float->int casts) or by a negative log, where transformers' buckets fall with the
    distance and then turn into negative table indices. Only the exact buckets, distances below
    ``max_exact``, are taken as defined then.
    """
    max_exact = exact_bucket_count(num_buckets, bidirectional)
    return None if max_distance > max_exact else max_exact - 1


def check_distance(longest: int, num_buckets: int, max_distance: int, bidirectional: bool):
    """Raise ValueError when a relative distance of ``longest`` has no defined bucket."""
    if longest >= MAX_TABLE_DISTANCE and max_distance > MAX_TABLE_DISTANCE:
        raise ValueError(f"relative distances of {MAX_TABLE_DISTANCE} or more are not supported with "
                         f"relative_attention_max_distance={max_distance} (above {MAX_TABLE_DISTANCE}): "
                         f"got a distance of {longest}")
    limit = longest_defined_distance(num_buckets, max_distance, bidirectional)
    if limit is not None and longest > limit:
        raise ValueError(
            f"relative_attention_max_distance={max_distance} is not above where the "
            f"{'bidirectional' if bidirectional else 'causal'} log-scale buckets start ({limit + 1}, with "
            f"relative_attention_num_buckets={num_buckets}): buckets are defined only for distances up to "
            f"{limit} (transformers' formula divides by zero or runs backwards past them), so "
            f"{'the encoder input' if bidirectional else 'the decoder sequence'} may hold at most "
            f"{limit + 1} tokens; got a distance of {longest}")


def position_bias(bias_table: torch.Tensor, query_positions: torch.Tensor, key_length: int,
                  bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bias ``[1, H, Lq, Lk]`` for queries at ``query_positions`` (``[Lq]``) and keys ``0..Lk-1``."""
    key_positions = torch.arange(key_length, dtype=torch.long, device=bias_table.device)
    relative = key_positions[None, :] - query_positions.to(torch.long)[:, None]
    buckets = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    return bias_table[buckets].permute(2, 0, 1).unsqueeze(0)
