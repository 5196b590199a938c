"""GEMMs with their epilogues fused: the gated FFN input projection and a linear layer + residual.

``out = act(x @ w_gate.T) [* (x @ w_up.T)] [+ residual]``, one ``[BLOCK_M, BLOCK_N]`` output tile
per program: the ``x`` tile is loaded once for both weights, both products accumulate in fp32 and
the activation, gate product and residual add happen in registers before the single store, so
neither ``[N, d_ff]`` intermediate ever reaches memory (eager writes three and reads four).
Programs are ordered in groups of ``GROUP_M`` row blocks so consecutive programs share weight
tiles in L2 (the Triton matmul tutorial's swizzle).

Both operands must have the same float dtype; fp32 multiplies in IEEE fp32 (torch's default),
not TF32. ``umt5_fast.ops.triton`` hands other cases (int8 weights, mixed dtypes) to eager.
"""
import torch
import triton
import triton.language as tl

from umt5_fast.kernels import SHARED_MEMORY_BUDGET, input_precision, launch_configs

# transformers ACT2FN names -> the kernel's epilogue. gelu_new and gelu_pytorch_tanh are the same
# function (tanh approximation), gelu is the exact erf form.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_erf",
               "relu": "relu", "silu": "silu", "swish": "silu"}


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "gelu_tanh":
        # 0.5 * x * (1 + tanh(u)) == x * sigmoid(2u): one exp, and no cancellation for x << 0.
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return x / (1.0 + tl.exp(-2.0 * u))
    elif ACTIVATION == "gelu_erf":
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == "relu":
        return tl.maximum(x, 0.0)
    elif ACTIVATION == "silu":
        return x / (1.0 + tl.exp(-x))
    else:
        return x


_MATMUL_CONFIGS = launch_configs(
    tuned=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
           for m, n, k, s, w in [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)
               (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 3, 8), (128, 128, 32, 4, 8),
               (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
               # decode steps: a handful of rows, so narrow tall-K tiles stream the weights with
               # enough programs to cover every SM even for d_model-wide outputs
               (16, 32, 256, 3, 4), (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4)]],
    # Fits shared memory for every dtype, gated or not.
    default=triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=4),
    # GROUP_M=2 and uneven tiles so the tests exercise the swizzle and every tail.
    interpreter=triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4, num_stages=1))


def _prune_configs(configs, named_args, **kwargs):
    rows, gated, element_size = kwargs["ROWS_CLASS"], kwargs["GATED"], named_args["x_ptr"].element_size()

    def fits(config):
        block_m, block_n, block_k = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
        if block_m > max(16, rows):
            return False
        if gated and block_m * block_n > 128 * 128:  # two fp32 accumulators in registers
            return False
        # num_stages x and weight tiles in shared memory
        stage_bytes = element_size * block_k * (block_m + block_n * (2 if gated else 1))
        return stage_bytes * config.num_stages <= SHARED_MEMORY_BUDGET

    return [c for c in configs if fits(c)] or configs


@triton.autotune(configs=_MATMUL_CONFIGS, key=["N", "K", "ROWS_CLASS", "ACTIVATION", "GATED", "HAS_RESIDUAL"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _matmul_epilogue_kernel(
        x_ptr, w_ptr, w_up_ptr, residual_ptr, out_ptr, M, N, K,
        stride_xm, stride_wn, stride_upn, stride_rm, stride_om,
        ROWS_CLASS: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    # ROWS_CLASS (the power of two above M, capped) only keys the autotuning cache.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m < M
    cols = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATED:
        up_ptrs = w_up_ptr + offs_n[:, None] * stride_upn + offs_k[None, :]
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_in_range = offs_k[None, :] < K - k_start
        x = tl.load(x_ptrs, mask=rows[:, None] & k_in_range, other=0.0)
        w = tl.load(w_ptrs, mask=cols[:, None] & k_in_range, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        if GATED:
            w_up = tl.load(up_ptrs, mask=cols[:, None] & k_in_range, other=0.0)
            acc_up = tl.dot(x, tl.trans(w_up), acc_up, input_precision=INPUT_PRECISION)
            up_ptrs += BLOCK_K

    out = _activation(acc, ACTIVATION)
    if GATED:
        out = out * acc_up
    tile_mask = rows[:, None] & cols[None, :]
    if HAS_RESIDUAL:
        out += tl.load(residual_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=tile_mask).to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=tile_mask)


def _launch(x, weight, w_up, residual, activation, out):
    in_features = x.shape[-1]
    out_features = weight.shape[0]
    rows = x.reshape(-1, in_features)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    weight, w_up = (w if w is None or w.stride(-1) == 1 else w.contiguous() for w in (weight, w_up))
    num_rows = rows.shape[0]
    if out is None:
        out = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
    out_rows = out.view(num_rows, out_features)
    residual_rows = None if residual is None else residual.reshape(num_rows, out_features)
    if residual_rows is not None and residual_rows.stride(-1) != 1:  # the epilogue reads columns contiguously
        residual_rows = residual_rows.contiguous()
    grid = lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]) * triton.cdiv(out_features, meta["BLOCK_N"]),)  # noqa: E731
    _matmul_epilogue_kernel[grid](
        rows, weight, weight if w_up is None else w_up, rows if residual_rows is None else residual_rows, out_rows,
        num_rows, out_features, in_features, rows.stride(0), weight.stride(0),
        0 if w_up is None else w_up.stride(0), 0 if residual_rows is None else residual_rows.stride(0),
        out_rows.stride(0),
        ROWS_CLASS=min(triton.next_power_of_2(num_rows), 256), ACTIVATION=activation, GATED=w_up is not None,
        HAS_RESIDUAL=residual is not None, INPUT_PRECISION=input_precision(x.dtype))
    return out


def gated_ffn_in(x, w_gate, w_up, activation, out=None):
    """``act(x @ w_gate.T) * (x @ w_up.T)`` (or ``act(x @ w_gate.T)`` when ``w_up`` is None) in one
    kernel. ``x`` ``[..., d_model]``, weights ``[d_ff, d_model]`` of ``x``'s dtype, ``activation``
    a key of ``ACTIVATIONS``. ``out`` ``[..., d_ff]`` contiguous, written if given."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} has no fused epilogue; supported: {sorted(ACTIVATIONS)}")
    return _launch(x, w_gate, w_up, None, ACTIVATIONS[activation], out)


def linear(x, weight, residual=None, out=None):
    """``x @ weight.T (+ residual)`` with the residual added in the GEMM's epilogue; ``weight``
    ``[out, in]`` and ``residual`` ``[..., out]`` of ``x``'s dtype."""
    return _launch(x, weight, None, residual, "identity", out)
