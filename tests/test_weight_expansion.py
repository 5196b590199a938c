"""The C++ expansion of packed 8-bit weights (csrc/expand_weights.cpp) against the torch expressions
it replaces (``PackedWeight._dequantize_rows`` in fp32 blocks, then one rounding): bit-identical, on
odd shapes, every fp8 code (NaN and subnormals included), GGUF Q8_0 blocks read in place, and the
reused expansion buffers of a model's runtime."""
import pytest
import torch

from umt5_fast.model import Runtime
from umt5_fast.quant import Float8Weight, Q8_0Weight, QuantizedWeight, expand_in_row_blocks

pytest.importorskip("umt5_fast._C")
DTYPES = [torch.bfloat16, torch.float32]
pytestmark = pytest.mark.usefixtures("every_cpu_isa")  # the int8 expansion is vectorised per ISA


def torch_reference(weight, dtype):
    return expand_in_row_blocks(weight.shape, dtype, weight._dequantize_rows)


def same_bits(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    as_int = {2: torch.int16, 4: torch.int32}[got.element_size()]
    return torch.equal(got.view(as_int), expected.view(as_int))


def random_codes(shape, generator):
    """Every byte value appears (all 256 fp8 codes, NaN included)."""
    codes = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    codes.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    return codes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scaled", [False, True])
def test_fp8(dtype, fp8, scaled):
    generator = torch.Generator().manual_seed(1)
    codes = random_codes((37, 91), generator)
    scale = torch.tensor(0.37 + torch.rand((), generator=generator).item()) if scaled else None
    weight = Float8Weight(codes.view(fp8), scale)
    got = weight.dequantize(dtype)
    expected = torch_reference(weight, dtype) if scaled else codes.view(fp8).to(dtype)
    assert torch.equal(got.isnan(), expected.isnan())
    assert same_bits(got.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (29, 83), (130, 257)])
def test_int8_per_row(dtype, shape):
    generator = torch.Generator().manual_seed(shape[1])
    weight = QuantizedWeight.quantize(torch.randn(shape, generator=generator) * 3)
    assert same_bits(weight.dequantize(dtype), torch_reference(weight, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_q8_0_blocks_in_place(dtype):
    """Blocks as a GGUF file holds them: fp16 scale then 32 values, 34 bytes, rows back to back."""
    generator = torch.Generator().manual_seed(3)
    rows, blocks = 23, 5
    raw = torch.randint(-127, 128, (rows, blocks, 34), dtype=torch.int8, generator=generator).view(torch.uint8)
    raw[..., :2] = (torch.rand(rows, blocks, 1, generator=generator) * 0.1).half().view(torch.uint8)
    weight = Q8_0Weight.from_blocks(raw.view(rows, blocks * 34))
    assert not weight.qweight.is_contiguous()
    assert same_bits(weight.dequantize(dtype), torch_reference(weight, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_q8_0_rounding_ties_and_non_finite_scales(dtype):
    """Products that lie exactly between two bf16 numbers (ties to even, down and up), and the inf
    / NaN products of a corrupt file's fp16 scales: Q8_0 blocks (whole vectors) and int8 rows of 21
    values (a scalar tail), on every ISA."""
    generator = torch.Generator().manual_seed(4)
    rows, blocks = 9, 3
    raw = torch.randint(-127, 128, (rows, blocks, 34), dtype=torch.int8, generator=generator)
    raw[:2, :, 2:6] = torch.tensor([1, -2, 4, 64], dtype=torch.int8)  # 9 significant bits times these
    raw = raw.view(torch.uint8)
    # 1 + 2^-8 sits halfway between 1 and 1 + 2^-7 (even: down); 1 + 3 * 2^-8 between 1 + 2^-7
    # and 1 + 2^-6 (even: up).
    scales = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8) * 2**-5, float("inf"), float("nan"), 2**-24,
                           65504.0, -0.0, 0.5 + 2**-9])
    raw[..., :2] = scales.half()[:, None, None].expand(rows, blocks, 1).contiguous().view(torch.uint8)
    q8_0 = Q8_0Weight.from_blocks(raw.view(rows, blocks * 34))
    # The same values per row, 21 of them (past the last whole vector: the scalar tail).
    per_row = QuantizedWeight(torch.randint(-127, 128, (rows, 21), dtype=torch.int8, generator=generator), scales)
    per_row.qweight[:2, 17:] = torch.tensor([1, -2, 4, 64], dtype=torch.int8)
    ties = torch.tensor([1.0, -2.0, 4.0, 64.0])
    for weight, tie_values in ((q8_0, lambda w: w.view(rows, blocks, 32)[:, :, :4]),
                               (per_row, lambda w: w[:, None, 17:])):
        got, expected = weight.dequantize(dtype), torch_reference(weight, dtype)
        assert torch.equal(got.isnan(), expected.isnan()) and bool(got.isnan().any())
        assert same_bits(got.nan_to_num(), expected.nan_to_num())
        if dtype == torch.bfloat16:
            at_ties = tie_values(got).float()
            assert torch.equal(at_ties[0], ties.expand_as(at_ties[0]))
            assert torch.equal(at_ties[1], (ties * (1 + 2**-6)).expand_as(at_ties[1]))


def test_out_argument_is_filled_and_checked():
    weight = QuantizedWeight.quantize(torch.randn(7, 9))
    out = torch.full((7, 9), float("nan"), dtype=torch.bfloat16)
    assert weight.dequantize(torch.bfloat16, out=out) is out
    assert same_bits(out, torch_reference(weight, torch.bfloat16))
    with pytest.raises(ValueError, match="out must be a contiguous torch.bfloat16 tensor of shape"):
        weight.dequantize(torch.bfloat16, out=torch.empty(9, 7, dtype=torch.bfloat16))


def test_runtime_expansion_buffers():
    runtime = Runtime("eager")
    first = runtime.expansion_buffer((4, 6), torch.bfloat16, "cpu")
    assert first.shape == (4, 6) and first.dtype == torch.bfloat16 and first.is_contiguous()
    again = runtime.expansion_buffer((3, 2), torch.float32, "cpu")
    assert again.data_ptr() == first.data_ptr()  # one slot, reused
    other = runtime.expansion_buffer((4, 6), torch.bfloat16, "cpu", slot=1)
    assert other.data_ptr() != first.data_ptr()
    too_big = Runtime.EXPANSION_BUFFER_MAX_BYTES // 4 + 1
    assert runtime.expansion_buffer((too_big,), torch.float32, "cpu") is None
