"""The W8A8 linear (csrc/w8a8_linear.cpp, w8a8_vnni.cpp, w8a8_avx2.cpp) against its torch reference
(``W8A8Weight.linear``: per-row quantised activations, products summed exactly in fp64): equal bit for
bit on every instruction set the CPU runs (the VNNI kernel under avx512 where the CPU has VNNI, the
AVX2 kernel under avx2 and on avx512 without VNNI, the portable one under generic),
on shapes that leave partial tiles and a partial last 64-byte chunk; in both weight layouts: the column
blocks of ``W8A8Weight`` and the plain int8 rows of ``W8A8RowWeight`` (which ``quantize="w8a8"`` loads
without VNNI, and the LM head screen's product)."""
import pytest
import torch

import umt5_fast.ops.cpu as cpu_ops
from umt5_fast.ops import eager
from umt5_fast.quant import QuantizedWeight, W8A8RowWeight, W8A8Weight

_C = pytest.importorskip("umt5_fast._C")


pytestmark = pytest.mark.usefixtures("every_cpu_isa")
LAYOUTS = ["blocks", "rows"]


def integer_product(x, weight, layout, residual=None):
    """The kernel's W8A8 product of fp32 x [rows, in] with ``weight`` (a W8A8Weight) in ``layout``:
    as packed, or on the same int8 values in rows."""
    if layout == "rows":
        weight = W8A8RowWeight(weight.unpacked().contiguous(), weight.scale)
    return cpu_ops.linear(x, weight, residual)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 17])
@pytest.mark.parametrize("in_features,out_features", [(1, 3), (7, 24), (64, 16), (77, 33), (512, 19), (1030, 65)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_equals_reference(rows, in_features, out_features, with_residual, layout):
    generator = torch.Generator().manual_seed(rows * 1000 + in_features + out_features)
    x = torch.randn(rows, in_features, generator=generator) * 3
    weight = W8A8Weight.quantize(torch.randn(out_features, in_features, generator=generator))
    residual = torch.randn(rows, out_features, generator=generator) if with_residual else None
    expected = eager.linear(x, weight, residual)
    got = integer_product(x, weight, layout, residual)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("rows", [1, 2, 16])
def test_row_layout_on_a_head_sized_weight(rows):
    """Many threads' ranges and whole tiles of the row kernels (K = 512, umt5-small's head width):
    equal to the blocks kernel bit for bit."""
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 512, generator=generator)
    weight = W8A8Weight.quantize(torch.randn(4099, 512, generator=generator))
    assert torch.equal(integer_product(x, weight, "rows"), cpu_ops.linear(x, weight))


def test_row_layout_is_the_weight_only_rows():
    """``W8A8RowWeight.quantize`` holds what ``QuantizedWeight.quantize`` does, with the same
    interface as the column blocks (rows, dequantize, the reference); a mismatched shape is refused."""
    w = torch.randn(37, 70)
    rows, blocks, weight_only = W8A8RowWeight.quantize(w), W8A8Weight.quantize(w), QuantizedWeight.quantize(w)
    assert torch.equal(rows.qweight, weight_only.qweight) and torch.equal(rows.scale, weight_only.scale)
    assert rows.shape == blocks.shape == (37, 70) and torch.equal(rows.unpacked(), blocks.unpacked())
    assert torch.equal(rows.dequantize(), blocks.dequantize())
    index = torch.tensor([5, 0, 36])
    picked = rows.rows(index)
    assert type(picked) is W8A8RowWeight and torch.equal(picked.qweight, blocks.rows(index).unpacked())
    x = torch.randn(3, 70)
    assert torch.equal(rows.linear(x), blocks.linear(x))
    with pytest.raises(ValueError, match=r"W8A8RowWeight.qweight must be \[36, in_features\]"):
        W8A8RowWeight(rows.qweight, rows.scale[:36])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_and_non_finite_rows(layout):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 100, generator=generator)
    x[1] = 0
    x[2, 7] = float("inf")
    x[3, 9] = float("nan")
    weight = W8A8Weight.quantize(torch.randn(10, 100, generator=generator))
    got = integer_product(x, weight, layout)
    assert torch.equal(got[1], torch.zeros(10))
    assert got[2:].isnan().all() and got[0].isfinite().all()
    assert torch.equal(got[:2], weight.linear(x)[:2])


def test_quantisation_error_is_bounded():
    """Against the fp32 product of the dequantised weights: activation rounding only (<= half a step
    of 127 per element), here well under 2% of the output scale."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 512, generator=generator)
    weight = W8A8Weight.quantize(torch.randn(300, 512, generator=generator))
    exact = x @ weight.dequantize().T
    error = (cpu_ops.linear(x, weight) - exact).abs().max() / exact.abs().max()
    assert 0 < error < 2e-2


def test_leading_dims_and_wide_inputs_fall_back_exactly():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 40, generator=generator)
    weight = W8A8Weight.quantize(torch.randn(7, 40, generator=generator))
    assert torch.equal(cpu_ops.linear(x, weight), weight.linear(x))
    with pytest.raises(ValueError, match="in_features"):  # the kernel itself refuses int32 overflow
        _C.w8a8_linear(x=0, qweight=0, row_layout=False, scale=0, residual=0, y=0, rows=1, in_features=70000,
                       out_features=1, num_threads=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_activations_take_the_kernel_with_reference_results(dtype, monkeypatch):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 70, generator=generator).to(dtype)
    weight = W8A8Weight.quantize(torch.randn(9, 70, generator=generator))
    residual = torch.randn(5, 9, generator=generator).to(dtype)
    expected = eager.linear(x, weight, residual)
    calls = []
    kernel = _C.w8a8_linear
    monkeypatch.setattr(cpu_ops._C, "w8a8_linear", lambda **kw: calls.append(1) or kernel(**kw))
    got = cpu_ops.linear(x, weight, residual)
    assert calls and got.dtype == dtype and torch.equal(got, expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_activation_rounding_ties_and_extremes(layout):
    """Rows whose scaled values land exactly on .5 (amax = 127: the scale is 1), hit +-127, or are
    tiny: every kernel rounds half to even and clamps as the reference does."""
    ties = torch.tensor([127.0, 2.5, -3.5, 0.5, 1.5, -0.5, -127.0, 126.5, 1e-30] * 9)[:77]
    x = torch.stack([ties, -ties, ties * 1e-20, torch.full((77,), 3.0)])
    weight = W8A8Weight.quantize(torch.randn(21, 77, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(integer_product(x, weight, layout), weight.linear(x))


def test_activation_ties_after_a_correctly_rounded_127_over_amax():
    """x = amax / 2 scales to exactly 63.5 only if 127 / amax is divided (correctly rounded), as the
    kernels do; torch's 127.0 / tensor would be 127 * (1 / amax) and round the tie the other way."""
    for in_features in (64, 65, 100):
        weight = torch.zeros(16, in_features)
        weight[0, :2] = 1.0
        packed = W8A8Weight.quantize(weight)
        x = torch.full((1, in_features), 0.001)
        x[0, 0], x[0, 1] = 2.375, 1.1875
        assert torch.equal(cpu_ops.linear(x, packed), packed.linear(x))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_so_small_that_127_over_amax_overflows(layout):
    """Below amax ~3.7e-37, 127 / amax is inf: the largest float stands in (no NaN from 0 * inf in
    padding lanes or zero entries), the same on every ISA and in the reference."""
    generator = torch.Generator().manual_seed(5)
    weight = W8A8Weight.quantize(torch.randn(3, 21, generator=generator))
    x = torch.randn(3, 21, generator=generator) * 1e-38
    x[1, 4] = 0.0
    got = integer_product(x, weight, layout)
    assert got.isfinite().all() and torch.equal(got, weight.linear(x))
    exact = x.double() @ weight.dequantize().double().T
    assert ((got.double() - exact).abs() <= 0.2 * exact.abs().max()).all()  # subnormal scales: coarse


@pytest.mark.parametrize("in_features", [64, 70])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_extreme_weights_and_activations_sum_exactly(in_features, layout):
    """The AVX2 kernel's int16 pair sums at their limits: weights at -128 (which a packed weight may
    hold, though the quantiser clamps to +-127) and 127 against activations quantised to +-127
    (2 * 128 * 127 = 32512 < 32767). Equal to the exact reference on every kernel."""
    generator = torch.Generator().manual_seed(4)
    q = torch.tensor([-128, 127], dtype=torch.int8)[torch.randint(0, 2, (37, in_features), generator=generator)]
    q[0], q[1], q[2] = -128, 127, torch.tensor([-128, -128, 127, 127], dtype=torch.int8).repeat(in_features)[:in_features]
    weight = W8A8Weight(qweight=W8A8Weight.pack(q), scale=torch.rand(37, generator=generator) + 0.5)
    x = torch.where(torch.rand(6, in_features, generator=generator) < 0.5, -1.0, 1.0) * 3  # all q = +-127
    x[5, ::3] = 0.5
    expected = eager.linear(x, weight)
    assert torch.equal(integer_product(x, weight, layout), expected)
    assert torch.equal(expected[:2, 0], (x[:2].sign() * 127).sum(-1) * -128 * (3 / 127 * weight.scale[0]))
