"""kernels.rms_norm against the eager reference (umt5_fast.ops.eager.rms_norm), dtype included."""
import pytest
import torch

from umt5_fast.kernels.rms_norm import add_rms_norm, rms_norm
from umt5_fast.ops import eager

# (x dtype, weight dtype, atol, rtol). The kernel does eager's fp32 math; only the sum order of
# the mean square differs, then one rounding to the output dtype.
DTYPES = [(torch.float32, torch.float32, 1e-5, 1e-5), (torch.float16, torch.float16, 2e-3, 2e-3),
          (torch.float16, torch.float32, 1e-5, 1e-5), (torch.float32, torch.float16, 2e-3, 2e-3)]


@pytest.mark.parametrize("x_dtype, weight_dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16), (3, 7, 80), (5, 341)])
def test_rms_norm(shape, x_dtype, weight_dtype, atol, rtol, device, nan_filled):
    x = (torch.randn(shape, device=device) * 3).to(x_dtype)
    weight = (torch.rand(shape[-1], device=device) + 0.5).to(weight_dtype)
    expected = eager.rms_norm(x, weight, 1e-6)
    out = nan_filled(shape, expected.dtype)
    assert rms_norm(x, weight, 1e-6, out=out) is out
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    assert rms_norm(x, weight, 1e-6).dtype == expected.dtype


def test_rms_norm_strided_rows(device):
    """Rows of a wider buffer (e.g. a slice of a fused projection), and a strided weight view."""
    buffer = torch.randn(6, 100, device=device)
    x = buffer[:, 10:90]
    weight = torch.rand(80, device=device)
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), eager.rms_norm(x, weight, 1e-6), atol=1e-5, rtol=1e-5)
    strided_weight = torch.rand(160, device=device).add(0.5)[::2]
    torch.testing.assert_close(rms_norm(x, strided_weight, 1e-6), eager.rms_norm(x, strided_weight, 1e-6),
                               atol=1e-5, rtol=1e-5)
    summed, out = add_rms_norm(x, x.t().contiguous().t(), strided_weight, 1e-6)
    torch.testing.assert_close(out, eager.rms_norm(x + x, strided_weight, 1e-6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("x_dtype, weight_dtype, atol, rtol", DTYPES[:2])
def test_add_rms_norm(x_dtype, weight_dtype, atol, rtol, device, nan_filled):
    x = torch.randn(3, 5, 96, device=device).to(x_dtype)
    residual = torch.randn(3, 5, 96, device=device).to(x_dtype)
    weight = torch.rand(96, device=device).to(weight_dtype)
    summed, out = nan_filled(x.shape, x_dtype), nan_filled(x.shape, weight_dtype)
    add_rms_norm(x, residual, weight, 1e-6, out=out, summed=summed)
    torch.testing.assert_close(summed, x + residual, atol=0, rtol=0)
    torch.testing.assert_close(out, eager.rms_norm(x + residual, weight, 1e-6), atol=atol, rtol=rtol)


@pytest.mark.cuda_only
def test_bfloat16(device):
    x = torch.randn(4, 33, 4096, device=device, dtype=torch.bfloat16)
    weight = torch.rand(4096, device=device, dtype=torch.bfloat16)
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), eager.rms_norm(x, weight, 1e-6), atol=2e-2, rtol=2e-2)


def test_triton_backend(device):
    from umt5_fast.ops import triton as triton_ops
    x = torch.randn(3, 48, device=device, dtype=torch.float16)
    for weight in (torch.rand(48, device=device), torch.rand(48, device=device, dtype=torch.float64)):
        expected = eager.rms_norm(x, weight, 1e-6)  # the fp64 weight is handed to eager
        result = triton_ops.rms_norm(x, weight, 1e-6)
        assert result.dtype == expected.dtype
        torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)
