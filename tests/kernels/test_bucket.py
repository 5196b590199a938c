"""The in-kernel bucket equals umt5_fast.buckets and transformers' UMT5 over every relative position."""
import pytest
import torch
import triton
import triton.language as tl
from transformers import UMT5Config
from transformers.models.umt5.modeling_umt5 import UMT5Attention

from umt5_fast.buckets import longest_defined_distance, relative_position_bucket
from umt5_fast.kernels.bucket import bucket_table, relative_position_bias

RELATIVE_POSITIONS = torch.arange(-8192, 8193)


def transformers_bucket(relative_position, bidirectional, num_buckets, max_distance):
    config = UMT5Config(d_model=8, d_kv=4, num_heads=2, is_decoder=not bidirectional,
                        relative_attention_num_buckets=num_buckets,
                        relative_attention_max_distance=max_distance)
    return UMT5Attention(config, has_relative_attention_bias=True)._relative_position_bucket(relative_position)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (20, 40), (8, 16), (64, 256), (19, 25), (37, 61)])
def test_bucket_matches_torch_and_transformers(bidirectional, num_buckets, max_distance, device):
    ours = bucket_table(RELATIVE_POSITIONS.to(device), bidirectional, num_buckets, max_distance).cpu().long()
    reference = relative_position_bucket(RELATIVE_POSITIONS, bidirectional, num_buckets, max_distance)
    transformers = transformers_bucket(RELATIVE_POSITIONS, bidirectional, num_buckets, max_distance)
    assert torch.equal(reference, transformers)
    mismatches = (ours != reference).nonzero().flatten()
    assert mismatches.numel() == 0, (
        f"kernel bucket differs at relative positions {RELATIVE_POSITIONS[mismatches][:10].tolist()}: "
        f"kernel {ours[mismatches][:10].tolist()}, torch {reference[mismatches][:10].tolist()}")


def test_bucket_keeps_shape(device):
    relative = torch.arange(-6, 6).reshape(3, 4)
    ours = bucket_table(relative.to(device), True, 32, 128).cpu().long()
    assert torch.equal(ours, relative_position_bucket(relative, True, 32, 128))


@triton.jit
def _gather_kernel(table_ptr, relative_position_ptr, out_ptr, numel, BIDIRECTIONAL: tl.constexpr,
                   NUM_BUCKETS: tl.constexpr, MAX_DISTANCE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < numel
    relative_position = tl.load(relative_position_ptr + offsets, mask=in_range, other=0)
    bias = relative_position_bias(table_ptr, 1, relative_position, BIDIRECTIONAL, NUM_BUCKETS, MAX_DISTANCE)
    tl.store(out_ptr + offsets, bias, mask=in_range)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 7), (33, 8), (20, 5), (32, 128)])
def test_bias_gather_stays_inside_the_table_where_no_bucket_is_defined(bidirectional, num_buckets,
                                                                       max_distance, device):
    """A max_distance not above the exact buckets defines no bucket for far distances (transformers'
    formula gives negative ones there). The model refuses such inputs, but kernels still evaluate
    lanes past the sequence (a tile's tail) and discard them: the gather of every lane must read
    an entry of the table (it once read far outside it and crashed the process), and distances
    with a defined bucket get that bucket's entry."""
    table = torch.arange(1, num_buckets + 1, dtype=torch.float32, device=device)
    out = torch.empty(RELATIVE_POSITIONS.numel(), dtype=torch.float32, device=device)
    relative = RELATIVE_POSITIONS.to(torch.int32).to(device)
    _gather_kernel[(triton.cdiv(out.numel(), 1024),)](table, relative, out, out.numel(), bidirectional,
                                                       num_buckets, max_distance, BLOCK=1024)
    out = out.cpu()
    assert bool(((out >= 1) & (out <= num_buckets) & (out == out.round())).all()), "a lane read outside the table"
    longest = longest_defined_distance(num_buckets, max_distance, bidirectional)
    distance = RELATIVE_POSITIONS.abs() if bidirectional else (-RELATIVE_POSITIONS).clamp_min(0)
    defined = distance <= longest if longest is not None else torch.ones_like(distance, dtype=torch.bool)
    expected = relative_position_bucket(RELATIVE_POSITIONS[defined], bidirectional, num_buckets, max_distance) + 1
    assert torch.equal(out[defined], expected.float())
