"""The in-kernel bucket equals umt5_fast.buckets and transformers' UMT5 over every relative position."""
import pytest
import torch
from transformers import UMT5Config
from transformers.models.umt5.modeling_umt5 import UMT5Attention

from umt5_fast.buckets import relative_position_bucket
from umt5_fast.kernels.bucket import bucket_table

RELATIVE_POSITIONS = torch.arange(-8192, 8193)


def transformers_bucket(relative_position, bidirectional, num_buckets, max_distance):
    config = UMT5Config(d_model=8, d_kv=4, num_heads=2, is_decoder=not bidirectional,
                        relative_attention_num_buckets=num_buckets,
                        relative_attention_max_distance=max_distance)
    return UMT5Attention(config, has_relative_attention_bias=True)._relative_position_bucket(relative_position)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (20, 40), (8, 16), (64, 256)])
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
