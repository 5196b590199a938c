"""T5 RMSNorm (no mean, no bias), optionally fused with the residual add that precedes it.

One program per row: the row is read once, its mean square taken in fp32, and the result
written once, so the kernel runs at memory bandwidth. The arithmetic and output dtype mirror
``umt5_fast.ops.eager.rms_norm``: ``x * rsqrt(mean(x.float()**2) + eps)`` in fp32, rounded to the
weight's dtype when that is fp16/bf16 *before* the multiply by the weight; the output has the
weight's dtype (what torch's type promotion gives for fp32, fp16 and bf16 weights).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr, stride_x, stride_residual, stride_out,
                     stride_sum, n_cols, eps, HAS_RESIDUAL: tl.constexpr, HALF_WEIGHT: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to its storage dtype first: the next layer adds to what is stored.
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_residual + cols, mask=in_row,
                                        other=0.0).to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=in_row)
    x = x.to(tl.float32)
    normalized = x * tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    weight = tl.load(weight_ptr + cols, mask=in_row)
    if HALF_WEIGHT:
        out = weight * normalized.to(weight.dtype)
    else:
        out = weight.to(tl.float32) * normalized
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=in_row)


def _num_warps(block):
    return 4 if block < 2048 else 8 if block < 8192 else 16


def _launch(x, residual, weight, eps, out, summed):
    n_cols = x.shape[-1]
    # Rows may be strided (views of a bigger buffer) but each row must be contiguous.
    rows, residual_rows = (None if t is None else t.reshape(-1, n_cols) for t in (x, residual))
    rows, residual_rows = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (rows, residual_rows))
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()  # the kernel reads weight_ptr + cols
    if out is None:
        out = torch.empty(x.shape, dtype=weight.dtype, device=x.device)
    out_rows = out.view(-1, n_cols)
    summed_rows = None if summed is None else summed.view(-1, n_cols)
    block = triton.next_power_of_2(n_cols)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, rows if residual_rows is None else residual_rows, weight, out_rows,
        out_rows if summed_rows is None else summed_rows, rows.stride(0),
        0 if residual_rows is None else residual_rows.stride(0), out_rows.stride(0),
        0 if summed_rows is None else summed_rows.stride(0), n_cols, eps,
        HAS_RESIDUAL=residual is not None, HALF_WEIGHT=weight.dtype in (torch.float16, torch.bfloat16),
        BLOCK=block, num_warps=_num_warps(block))
    return out


def rms_norm(x, weight, eps, out=None):
    """RMSNorm of ``x`` ``[..., d]`` (last dim contiguous) with ``weight`` ``[d]`` (fp32/fp16/bf16);
    returns ``out`` (``x``'s shape, ``weight``'s dtype, contiguous), written if given."""
    return _launch(x, None, weight, eps, out, None)


def add_rms_norm(x, residual, weight, eps, out=None, summed=None):
    """``(x + residual, rms_norm(x + residual))`` in one pass; ``x`` and ``residual`` of one dtype, the
    sum in that dtype. ``summed`` and ``out`` are written if given."""
    if summed is None:
        summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return summed, _launch(x, residual, weight, eps, out, summed)
