"""kernels.gated_ffn against the eager reference (umt5_fast.ops.eager.gated_ffn_in / linear)."""
import pytest
import torch

from umt5_fast.kernels.gated_ffn import ACTIVATIONS, gated_ffn_in, linear
from umt5_fast.ops import eager

# (dtype, atol, rtol). Half precision is compared with eager in fp32 on the same inputs: eager in
# fp16 rounds both GEMM outputs and the activation to fp16, the kernel only its final result.
DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 1e-2, 1e-2)]


def upcast(*tensors):
    return [None if t is None else t.float() for t in tensors]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("gated", [True, False])
def test_gated_ffn_in(activation, gated, dtype, atol, rtol, device, nan_filled):
    x = torch.randn(2, 17, 40, device=device).to(dtype)  # 34 rows: three row blocks, one partial
    w_gate = (torch.randn(70, 40, device=device) / 40 ** 0.5).to(dtype)
    w_up = (torch.randn(70, 40, device=device) / 40 ** 0.5).to(dtype) if gated else None
    out = nan_filled((2, 17, 70), dtype)
    assert gated_ffn_in(x, w_gate, w_up, activation, out=out) is out
    expected = eager.gated_ffn_in(*upcast(x, w_gate, w_up), activation).to(dtype)
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("rows, in_features, out_features", [(1, 24, 16), (7, 80, 33), (35, 64, 70)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_linear(rows, in_features, out_features, with_residual, dtype, atol, rtol, device, nan_filled):
    x = torch.randn(rows, in_features, device=device).to(dtype)
    weight = (torch.randn(out_features, in_features, device=device) / in_features ** 0.5).to(dtype)
    residual = torch.randn(rows, out_features, device=device).to(dtype) if with_residual else None
    out = nan_filled((rows, out_features), dtype)
    linear(x, weight, residual, out=out)
    expected = eager.linear(*upcast(x, weight), None if residual is None else residual.float()).to(dtype)
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


def test_linear_reads_strided_rows(device):
    """A [B, L, H*D] attention output viewed with non-contiguous rows."""
    buffer = torch.randn(5, 48, device=device)
    x = buffer[:, :40]
    weight = torch.randn(24, 40, device=device)
    torch.testing.assert_close(linear(x, weight), eager.linear(x, weight), atol=1e-4, rtol=1e-4)
    residual = torch.randn(24, 5, device=device).t()  # columns strided
    torch.testing.assert_close(linear(x, weight, residual), eager.linear(x, weight, residual), atol=1e-4, rtol=1e-4)


def test_unknown_activation_is_refused(device):
    x = torch.randn(2, 16, device=device)
    with pytest.raises(ValueError, match="mish"):
        gated_ffn_in(x, torch.randn(16, 16, device=device), None, "mish")


@pytest.mark.cuda_only
@pytest.mark.parametrize("rows", [4, 1024])
def test_bfloat16(rows, device):
    x = torch.randn(rows, 512, device=device, dtype=torch.bfloat16)
    w_gate, w_up = (torch.randn(1024, 512, device=device, dtype=torch.bfloat16) / 512 ** 0.5 for _ in range(2))
    expected = eager.gated_ffn_in(*upcast(x, w_gate, w_up), "gelu_new").to(torch.bfloat16)
    torch.testing.assert_close(gated_ffn_in(x, w_gate, w_up, "gelu_new"), expected, atol=3e-2, rtol=3e-2)


def test_triton_backend_kernels_and_fallbacks(device):
    from umt5_fast.ops import triton as triton_ops
    from umt5_fast.quant import QuantizedWeight
    x = torch.randn(5, 32, device=device)
    w_gate, w_up = (torch.randn(48, 32, device=device) / 32 ** 0.5 for _ in range(2))
    residual = torch.randn(5, 48, device=device)
    cases = [  # each run by both backends; the last three are fallbacks to eager
        (lambda ops: ops.gated_ffn_in(x, w_gate, w_up, "gelu_new")),
        (lambda ops: ops.linear(x, w_gate, residual)),
        (lambda ops: ops.gated_ffn_in(x, QuantizedWeight.quantize(w_gate), w_up, "gelu_new")),
        (lambda ops: ops.gated_ffn_in(x, w_gate, w_up, "mish")),
        (lambda ops: ops.linear(x.half(), w_gate)),  # fp32 weight under fp16 activations
    ]
    for case in cases:
        torch.testing.assert_close(case(triton_ops), case(eager), atol=1e-4, rtol=1e-4)
