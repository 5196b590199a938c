"""The ``cpu`` backend: C++ kernels from ``csrc/`` (the ``umt5_fast._C`` extension).

Same functions and semantics as ``umt5_fast.ops.eager``; importing this module raises ImportError
when the extension is not built, which is how ``umt5_fast.ops`` decides whether "cpu" exists.

What runs where (fp32 activations):

- ``rms_norm`` / ``add_rms_norm``: C++, fp32 variance.
- ``attention`` / ``decode_attention``: one fused C++ kernel with in-kernel bucketing, masks and
  an online softmax; no ``[B, H, Lq, Lk]`` tensor is built. ``attention`` on bf16 q, k, v on CPUs
  with AVX512-BF16: the bf16 kernel (bf16 pair products summed in fp32, fp32 softmax, probabilities
  rounded to bf16 before ``p @ v`` as transformers rounds them, output rounded once). Other bf16 /
  fp16 q, k, v: the fp32 kernel on an fp32 copy of q, reading K/V as they are (converted as loaded
  for one query row, as in the C++ decode step; widened a key tile at a time, or into fp32 copies
  where several query blocks read them), output rounded once. Both are more accurate than eager's
  half-precision scores, so not bit-equal to it.
- ``argmax``: greedy decoding's pick, one C++ pass over the rows.
- ``log_softmax``: torch's, with subnormal results flushed to zero meanwhile (the same bits, without
  x86's slow path for them).
- ``top_k``: one C++ pass per row against the current k-th best (beam search's candidates).
- ``linear``: a float weight of ``x``'s dtype goes to torch's GEMM, except fp32 weights for up to
  ``fp32_kernel_max_rows()`` rows (decode steps, beams), which take the C++ GEMV (to 32 rows) or
  panel GEMM. On AVX-512 CPUs products
  of ``WIDE_GEMM_MIN_ROWS`` rows or more run as fp32 GEMMs, int8, bf16 and fp16 weights expanded to fp32
  for the call (``wide_gemm_computes``), in oneDNN where MKL runs AVX2 code (AMD CPUs:
  ``WIDE_GEMMS_IN_ONEDNN``), else in MKL. Otherwise a ``QuantizedWeight`` (int8), bf16 or fp16
  weight goes to the C++ weight-only kernels, which widen the weights in registers, so decoding
  reads 4x / 2x fewer bytes than fp32.
- ``linear`` with a ``W8A8Weight`` (column blocks) or ``W8A8RowWeight`` (rows): the activations
  are quantised to int8 per row and multiplied in integers (AVX512-VNNI ``vpdpbusd`` where the CPU
  has it, else AVX2 ``vpmaddubsw`` with the sign trick, else a portable loop: the same results on
  all three, in either layout).
- ``gated_ffn_in``: the projections through ``linear``, then ``act(a) * b`` by one C++ pass in
  place.
- bf16 / fp16 models: ``rms_norm`` (transformers' rounding points; for fp16 also on the fp32
  residual stream an fp32 ``wo`` leaves) and the gated activation (fp32 math, rounded once) in
  C++; linears of bf16 / fp16 x and weights of up to ``half_kernel_max_rows()`` rows through the C++
  kernels on the widened x (torch's half-precision GEMVs are slower there; without bf16 / fp16
  instructions as many rows as fp32 x, else ``HALF_KERNEL_MAX_ROWS``), larger ones through
  torch's GEMM in that dtype where it runs on bf16 / fp16 instructions (``NATIVE_BF16_GEMM``:
  AVX512-BF16 / AMX; ``NATIVE_FP16_GEMM``: AVX512-FP16 / AMX-FP16), else through torch's fp32
  GEMM on the exactly widened operands, rounded once (what torch's own fallback computes, 3-10x
  faster).
- bf16 / fp16 x with weight-only int8: the C++ int8 kernel on the widened x up to
  ``half_kernel_max_rows()`` rows; above, torch's GEMM in x's dtype on the expanded weight (eager)
  where it runs on that dtype's instructions, else the fp32 GEMM of the widened operands (the
  weight expanded to fp32 a slice at a time), rounded once.

Fallbacks to eager (same result, plain torch speed): activations that are not fp32 (except as
above: W8A8 linears, attention and the bf16 / fp16 paths); ``rms_norm`` with a bf16 weight and x of
another dtype, or an fp16 weight and x other than fp16 / fp32; activation names other than
``gelu_new``, ``gelu_pytorch_tanh``, ``gelu``, ``relu``, ``silu`` and ``swish``; a float weight of
another dtype than ``x`` other than bf16 / fp16 with fp32 ``x``; empty inputs. (A residual of
another shape or dtype than the output's: the kernel's product, then eager's add.)

Wrong arguments (types, devices, shapes) raise TypeError/ValueError naming the argument before
any pointer reaches C++. The kernels use ``torch.get_num_threads()`` threads.
"""
import math
import threading

import torch
import torch.nn.functional as F

# After torch: the extension then shares torch's bundled OpenMP runtime (one thread pool).
import umt5_fast._C as _C
from umt5_fast import buckets
from umt5_fast.ops import eager
from umt5_fast.quant import QuantizedWeight, W8A8RowWeight, W8A8Weight

name = "cpu"

# Activation names of the contract (transformers' ACT2FN) -> the C++ kernel's activation.
_KERNEL_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu_erf",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def _check_tensor(arg_name, value, dim=None):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{arg_name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_cpu:
        raise ValueError(f"{arg_name} must be on the CPU for backend 'cpu', got {value.device}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{arg_name} must have {dim} dimensions, got shape {tuple(value.shape)}")


def _all_fp32(*tensors):
    return all(t is None or t.dtype == torch.float32 for t in tensors)


def _half_precision(*tensors):
    return all(t.dtype == tensors[0].dtype for t in tensors) and tensors[0].dtype in (torch.bfloat16,
                                                                                     torch.float16)


def _rows_contiguous(t):
    """``t`` with a contiguous last dimension (other strides are passed to the kernel)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _threads():
    return torch.get_num_threads()


def _ptr(t):
    return 0 if t is None else t.data_ptr()


# ----------------------------------------------------------------------------------------------
# RMSNorm

def _check_norm_args(x, weight):
    _check_tensor("x", x)
    _check_tensor("weight", weight, dim=1)
    if x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"weight must have x.shape[-1] elements: x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")


_NORM_KERNELS = {(torch.float32, torch.float32): _C.rms_norm,
                 (torch.bfloat16, torch.bfloat16): _C.rms_norm_bf16,
                 (torch.float16, torch.float16): _C.rms_norm_fp16,
                 (torch.float32, torch.float16): _C.rms_norm_fp32_to_fp16}


def rms_norm(x, weight, eps):
    _check_norm_args(x, weight)
    # fp32 rows, or a bf16 / fp16 model's (transformers' rounding points; an fp16 model's residual
    # stream is fp32 after its first fp32 `wo`); anything else: eager
    kernel = _NORM_KERNELS.get((x.dtype, weight.dtype))
    if kernel is None or x.numel() == 0:
        return eager.rms_norm(x, weight, eps)
    x, weight = x.contiguous(), weight.contiguous()  # held by names: a temporary's memory would be freed
    out = torch.empty_like(x, dtype=weight.dtype)
    kernel(x=x.data_ptr(), weight=weight.data_ptr(), eps=float(eps), out=out.data_ptr(),
           rows=x.numel() // x.shape[-1], dim=x.shape[-1], num_threads=_threads())
    return out


def add_rms_norm(x, residual, weight, eps):
    """``hidden = residual + x`` and ``rms_norm(hidden, weight, eps)`` in one pass.

    Returns ``(hidden, normed)``: the new residual stream and the next sublayer's input.
    """
    _check_norm_args(x, weight)
    _check_tensor("residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, "
                         f"got {tuple(residual.shape)}")
    if not _all_fp32(x, residual, weight) or x.numel() == 0:
        hidden = residual + x
        return hidden, eager.rms_norm(hidden, weight, eps)
    x, residual, weight = x.contiguous(), residual.contiguous(), weight.contiguous()
    hidden, out = torch.empty_like(x), torch.empty_like(x)
    _C.add_rms_norm(x=x.data_ptr(), residual=residual.data_ptr(),
                    weight=weight.data_ptr(), eps=float(eps), hidden=hidden.data_ptr(),
                    out=out.data_ptr(), rows=x.numel() // x.shape[-1], dim=x.shape[-1],
                    num_threads=_threads())
    return hidden, out


# ----------------------------------------------------------------------------------------------
# Attention

def _check_bucket_args(bias_table, heads, bidirectional, num_buckets, max_distance, longest_distance):
    if bias_table is None:
        return None
    _check_tensor("bias_table", bias_table, dim=2)
    if tuple(bias_table.shape) != (num_buckets, heads):
        raise ValueError(f"bias_table must be [num_buckets, heads] = [{num_buckets}, {heads}], "
                         f"got {tuple(bias_table.shape)}")
    if buckets.exact_bucket_count(num_buckets, bidirectional) < 1:
        raise ValueError(f"num_buckets={num_buckets} leaves no exact bucket (need "
                         f"{'4' if bidirectional else '2'} <= num_buckets)")
    buckets.check_distance(longest_distance, num_buckets, max_distance, bidirectional)
    return bias_table.to(torch.float32).contiguous()


def _distance_buckets(table, num_buckets, max_distance, bidirectional):
    """The C++ kernels' bucket table (buckets.distance_buckets), or None without a bias table."""
    return None if table is None else buckets.distance_buckets(num_buckets, max_distance, bool(bidirectional))


def _check_key_padding_mask(key_padding_mask, batch, min_length):
    """The mask as 0/nonzero bytes with contiguous rows, or None."""
    if key_padding_mask is None:
        return None
    _check_tensor("key_padding_mask", key_padding_mask, dim=2)
    if key_padding_mask.shape[0] != batch or key_padding_mask.shape[1] < min_length:
        raise ValueError(f"key_padding_mask must be [batch, keys] = [{batch}, {min_length}], "
                         f"got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.dtype not in (torch.bool, torch.uint8):
        key_padding_mask = key_padding_mask.bool()
    return _rows_contiguous(key_padding_mask)


def _check_qkv(q, k, v, k_name, v_name):
    _check_tensor("q", q, dim=4)
    _check_tensor(k_name, k, dim=4)
    _check_tensor(v_name, v, dim=4)
    if k.shape != v.shape:
        raise ValueError(f"{k_name} and {v_name} must have one shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and {k_name} {tuple(k.shape)} must agree on batch, "
                         "heads and head_dim")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, {k_name} and {v_name} must have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")


# q, k, v dtypes the C++ attention takes: fp32; bf16 (bf16 products where the CPU has AVX512-BF16,
# else the fp32 kernel on an fp32 copy of q, widening K/V as it reads them) and fp16 (the same fp32
# kernel): scores and softmax in fp32, one rounding of the output.
_ATTENTION_ELEMENTS = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def attention(q, k, v, bias_table, *, bidirectional, num_buckets, max_distance,
              key_padding_mask=None, causal=False, query_offset=0, scale=1.0):
    _check_qkv(q, k, v, "k", "v")
    batch, heads, query_length, head_dim = q.shape
    key_length = k.shape[2]
    table = _check_bucket_args(bias_table, heads, bidirectional, num_buckets, max_distance,
                               max(int(query_offset) + query_length, key_length) - 1)
    mask = _check_key_padding_mask(key_padding_mask, batch, key_length)
    if mask is not None and mask.shape[1] != key_length:
        raise ValueError(f"key_padding_mask must have {key_length} keys, got {mask.shape[1]}")
    element = _ATTENTION_ELEMENTS.get(q.dtype)  # k, v: q's dtype (checked)
    if element is None or min(q.numel(), k.numel()) == 0:
        return eager.attention(q, k, v, bias_table, bidirectional=bidirectional,
                               num_buckets=num_buckets, max_distance=max_distance,
                               key_padding_mask=key_padding_mask, causal=causal,
                               query_offset=query_offset, scale=scale)
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    out = torch.empty(batch, query_length, heads, head_dim, dtype=q.dtype)
    distance_buckets = _distance_buckets(table, num_buckets, max_distance, bidirectional)
    _C.attention(q=q.data_ptr(), q_strides=q.stride()[:3], k=k.data_ptr(), k_strides=k.stride()[:3],
                 v=v.data_ptr(), v_strides=v.stride()[:3], out=out.data_ptr(), batch=batch,
                 heads=heads, query_length=query_length, key_length=key_length, head_dim=head_dim,
                 bias_table=_ptr(table), distance_buckets=_ptr(distance_buckets),
                 num_buckets=num_buckets, max_distance=max_distance,
                 bidirectional=bool(bidirectional), key_padding_mask=_ptr(mask),
                 mask_batch_stride=0 if mask is None else mask.stride(0), causal=bool(causal),
                 query_offset=int(query_offset), scale=float(scale), num_threads=_threads(),
                 element=element)
    return out


def decode_attention(q, k_cache, v_cache, cache_length, bias_table, *, num_buckets, max_distance,
                     key_padding_mask=None):
    _check_qkv(q, k_cache, v_cache, "k_cache", "v_cache")
    batch, heads, query_length, head_dim = q.shape
    if query_length != 1:
        raise ValueError(f"q must hold one query row per sequence, got shape {tuple(q.shape)}")
    if isinstance(cache_length, bool) or not isinstance(cache_length, (int, torch.Tensor)) or \
            (isinstance(cache_length, torch.Tensor) and (cache_length.numel() != 1 or cache_length.is_floating_point())):
        raise TypeError(f"cache_length must be an integer, got {cache_length!r}")
    length = int(cache_length)
    if not 1 <= length <= k_cache.shape[2]:
        raise ValueError(f"cache_length must be in [1, {k_cache.shape[2]}] (the cache size), "
                         f"got {length}")
    table = _check_bucket_args(bias_table, heads, False, num_buckets, max_distance, length - 1)
    mask = _check_key_padding_mask(key_padding_mask, batch, length)
    if _half_precision(q, k_cache, v_cache) and q.numel() > 0:
        # A bf16 / fp16 model: the one query row through ``attention`` on the written part of the
        # cache (the bf16 kernel, or the fp32 one reading the cache as it is), as its prefill and
        # cross-attention run.
        return attention(q, k_cache[:, :, :length], v_cache[:, :, :length], bias_table,
                         bidirectional=False, num_buckets=num_buckets, max_distance=max_distance,
                         key_padding_mask=None if mask is None else mask[:, :length], causal=True,
                         query_offset=length - 1)
    if not _all_fp32(q, k_cache, v_cache) or q.numel() == 0:
        return eager.decode_attention(q, k_cache, v_cache, length, bias_table,
                                      num_buckets=num_buckets, max_distance=max_distance,
                                      key_padding_mask=key_padding_mask)
    q, k_cache, v_cache = _rows_contiguous(q), _rows_contiguous(k_cache), _rows_contiguous(v_cache)
    out = torch.empty(batch, 1, heads, head_dim, dtype=q.dtype)
    distance_buckets = _distance_buckets(table, num_buckets, max_distance, False)
    _C.decode_attention(q=q.data_ptr(), q_strides=q.stride()[:3], k_cache=k_cache.data_ptr(),
                        k_strides=k_cache.stride()[:3], v_cache=v_cache.data_ptr(),
                        v_strides=v_cache.stride()[:3], out=out.data_ptr(), batch=batch,
                        heads=heads, cache_length=length, head_dim=head_dim,
                        bias_table=_ptr(table), distance_buckets=_ptr(distance_buckets),
                        num_buckets=num_buckets, max_distance=max_distance, key_padding_mask=_ptr(mask),
                        mask_batch_stride=0 if mask is None else mask.stride(0),
                        num_threads=_threads())
    return out


# ----------------------------------------------------------------------------------------------
# Greedy pick

def argmax(scores):
    _check_tensor("scores", scores, dim=2)
    if scores.dtype != torch.float32 or scores.stride(1) != 1 or scores.numel() == 0:
        return eager.argmax(scores)
    out = torch.empty(scores.shape[0], dtype=torch.long)
    _C.argmax_rows(x=scores.data_ptr(), rows=scores.shape[0], cols=scores.shape[1],
                   row_stride=scores.stride(0), out=out.data_ptr(), num_threads=_threads())
    return out


def log_softmax(scores, out=None):
    """eager's, bit for bit, run with subnormal results flushed to zero in this thread and the
    OpenMP threads torch's op runs on (csrc/float_env.cpp): on scores spread past 87 (a random-weight
    model's logits) most of ``exp(x - max)`` is subnormal, which x86 cores compute through microcode
    assists (``[64, 256384]`` scores: 27.5 -> 14.1 ms on an Ice Lake Xeon). Such terms cannot change
    the fp32 sum, which is at least 1, nor can any output be subnormal."""
    if scores.device.type != "cpu":
        return eager.log_softmax(scores, out)
    threads = _threads()
    was_on = _C.set_flush_to_zero(on=True, num_threads=threads)
    try:
        return eager.log_softmax(scores, out)
    finally:
        if not was_on:
            _C.set_flush_to_zero(on=False, num_threads=threads)


def top_k(scores, k):
    """One C++ pass per row (csrc/top_k.cpp; equal values: the lower index first) for fp32 rows with
    unit stride; other scores, a k outside [1, n], or a row holding a NaN: torch.topk."""
    _check_tensor("scores", scores, dim=2)
    rows, cols = scores.shape
    if scores.dtype != torch.float32 or scores.stride(1) != 1 or not 0 < k <= cols or rows == 0:
        return eager.top_k(scores, k)
    values = torch.empty(rows, k)
    indices = torch.empty(rows, k, dtype=torch.long)
    if not _C.top_k_rows(x=scores.data_ptr(), rows=rows, cols=cols, row_stride=scores.stride(0), k=k,
                         values=values.data_ptr(), indices=indices.data_ptr(), num_threads=_threads()):
        return eager.top_k(scores, k)  # a NaN: torch's rule for it
    return values, indices


def log_softmax_top_k(logits, k, banned=()):
    """One C++ pass per row for the best k + len(banned) logits (csrc/top_k.cpp), one more for the
    normaliser's sum of exp (vector lanes: it may differ from torch's sum in its last bits); no
    [rows, vocab] output. Other logits, a row holding a NaN or an infinite maximum: eager's."""
    _check_tensor("logits", logits, dim=2)
    rows, cols = logits.shape
    banned = sorted({int(i) for i in banned})
    if (logits.dtype != torch.float32 or logits.stride(1) != 1
            or not 0 < k <= cols - len(banned) or rows == 0):
        return eager.log_softmax_top_k(logits, k, banned)
    values = torch.empty(rows, k)
    indices = torch.empty(rows, k, dtype=torch.long)
    if not _C.log_softmax_top_k_rows(x=logits.data_ptr(), rows=rows, cols=cols, row_stride=logits.stride(0), k=k,
                                     banned=banned, values=values.data_ptr(), indices=indices.data_ptr(),
                                     num_threads=_threads()):
        return eager.log_softmax_top_k(logits, k, banned)
    return values, indices


# ----------------------------------------------------------------------------------------------
# Linear layers

def _check_linear_args(x, weight):
    _check_tensor("x", x)
    if isinstance(weight, QuantizedWeight):
        _check_tensor("weight.qweight", weight.qweight, dim=2)
        _check_tensor("weight.scale", weight.scale, dim=1)
        if weight.qweight.dtype != torch.int8:
            raise TypeError(f"weight.qweight must be int8, got {weight.qweight.dtype}")
        if weight.scale.shape[0] != weight.shape[0]:
            raise ValueError(f"weight.scale must have one entry per output row "
                             f"({weight.shape[0]}), got {tuple(weight.scale.shape)}")
        in_features = weight.shape[1]
    else:
        _check_tensor("weight", weight, dim=2)
        in_features = weight.shape[1]
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x.shape[-1] must equal weight's in_features {in_features}, "
                         f"got x {tuple(x.shape)}")


# Up to this many rows (decode steps, batches of beams) an fp32 weight goes to the C++ kernels: to
# 32 rows the GEMV, which streams each weight row once at memory bandwidth (torch's BLAS can run 2-4x
# slower there: MKL on AMD CPUs), from 33 the panel GEMM (csrc/kernels_impl.h), which widens a chunk
# of weight rows once and runs near the FMA peak; MKL takes ~2x its time on an LM head at 33-64 rows
# (its packing of the skinny x dominates), and is about as fast on small weights up to here. The
# portable build (no AVX2) keeps the GEMV's limit: its scalar panels are no match for a BLAS.
FP32_KERNEL_MAX_ROWS = 255
PORTABLE_FP32_KERNEL_MAX_ROWS = 32
# Likewise bf16 / fp16 x with weights of their dtype (or int8) where torch's GEMM in that dtype runs
# on its instructions (AVX512-BF16 / AMX): its bf16 GEMV reads the LM head ~3x slower than the C++
# kernel at one row, as fast at 16, faster above (its fp16 GEMV is slower still). Elsewhere the
# alternative is torch's fp32 GEMM of the widened operands, which the C++ kernels beat as they beat
# it for fp32 x: there bf16 / fp16 x go as far as fp32 x (``half_kernel_max_rows``).
HALF_KERNEL_MAX_ROWS = 16
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def float_kernel_computes(x_dtype: torch.dtype, weight_dtype: torch.dtype, rows: int) -> bool:
    """Whether ``linear`` multiplies ``rows`` rows of x with a float weight in the C++ kernel, whose
    sums for one row do not depend on the other rows (torch's GEMM, taken otherwise, may block them
    differently): fp32 x with bf16 / fp16 weights always, fp32, bf16 and fp16 pairs up to the limits
    above."""
    if x_dtype == torch.float32 and weight_dtype in _HALF_DTYPES:
        return True
    limit = fp32_kernel_max_rows() if x_dtype == torch.float32 else half_kernel_max_rows(x_dtype)
    return x_dtype == weight_dtype and 0 < rows <= limit


def fp32_kernel_max_rows() -> int:
    """The most rows an fp32 weight multiplies in the C++ kernels with the instruction set they run."""
    return PORTABLE_FP32_KERNEL_MAX_ROWS if _C.cpu_isa() == "generic" else FP32_KERNEL_MAX_ROWS


def half_kernel_max_rows(dtype: torch.dtype) -> int:
    """The most rows of bf16 / fp16 x (0 for other dtypes) the C++ kernels multiply, on the widened x."""
    if dtype not in _HALF_DTYPES:
        return 0
    return HALF_KERNEL_MAX_ROWS if _native_half_gemm(dtype) or _C.cpu_isa() == "generic" else FP32_KERNEL_MAX_ROWS


def int8_kernel_computes(x_dtype: torch.dtype, rows: int) -> bool:
    """Whether ``linear`` multiplies ``rows`` rows of x with a weight-only int8 weight in the C++
    kernel, unless a wide GEMM takes them (``wide_gemm_computes``): fp32 x, or a bf16 / fp16 model's
    x up to half_kernel_max_rows() rows (on the exactly widened x, the sums rounded to x's dtype once)."""
    return x_dtype == torch.float32 or 0 < rows <= half_kernel_max_rows(x_dtype)


# Whether torch's bf16 GEMM runs on bf16 dot products: oneDNN on AVX512-BF16 / AMX CPUs.
# Elsewhere it widens to fp32 on the way, and MKL's fp32 GEMM on the widened operands gives the
# fp32 sums rounded once too, faster: on AVX2-only CPUs torch takes a slow loop (Zen 3: 1024 x 512
# @ 1024 74 -> 17 ms, the same bits); on AVX-512 CPUs without BF16 oneDNN emulates bf16 at 30-60
# GFLOP/s against MKL's 150-220 (Ice Lake Xeon: 19.1 -> 5.3 ms; sums in another order, so the
# rounded outputs may differ from torch's by one bf16 ulp). torch's check follows oneDNN's cap
# (ONEDNN_MAX_CPU_ISA).
NATIVE_BF16_GEMM = (bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)())
                    and _C.cpu_has_avx512_bf16())
# Likewise fp16: torch's fp16 GEMM runs in oneDNN on fp16 instructions on CPUs with AVX512-FP16 /
# AMX-FP16; elsewhere it is a slow loop (Ice Lake Xeon: 1024 x 512 @ 1024 80 ms against 7.6 for
# fp32), and the fp32 GEMM of the widened operands gives the fp32 sums rounded once.
NATIVE_FP16_GEMM = (bool(getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)())
                    and _C.cpu_has_avx512_fp16())
# Weight elements widened to fp32 at a time (32 MB of fp32), so that a large bf16 / fp16 weight (the LM
# head) never sits in memory in fp32 whole, in a buffer kept per thread: a fresh fp32 copy per call
# of one umt5-xxl FFN weight (168 MB) cost 58 ms of page faults and writes on an Ice Lake Xeon, and
# smaller slices make MKL pack x again per slice. 512 x 4096 @ 10240 took 1.35x the fp32 GEMM's
# time, now 1.08x (4 MB slices: 1.1-1.3x; 64 MB: no faster).
HALF_WIDEN_CHUNK = 1 << 23
_widen_buffers = threading.local()


# On AVX-512 CPUs fp32 products of WIDE_GEMM_MIN_ROWS+ rows run as one fp32 GEMM in the faster of
# torch's two engines, int8 / bf16 / fp16 (weight-only) weights expanded to fp32 for the call: from this
# many rows that costs less than the weight-only kernels' widening in registers, which are bound
# by fp32 FMAs there, not bytes (1024 x 512 @ 1024: 6.1 -> 3.5 ms on a Xeon). Weights above
# WIDE_GEMM_MAX_WEIGHT elements (an LM head: 131M for umt5-small) are never expanded or reordered,
# so that no call makes a GB-sized copy; umt5-xxl's FFN weights (42M) are below it.
WIDE_GEMMS = "avx512" in _C.supported_cpu_isas()
WIDE_GEMM_MIN_ROWS = 256
WIDE_GEMM_MAX_WEIGHT = 1 << 26
# The engine: torch's fp32 GEMM is MKL's, which runs AVX-512 code on Intel CPUs only; on AMD CPUs
# it takes its AVX2 code, ~190 GFLOP/s on a 2-core Zen 5 whose AVX-512 FMAs peak near 530. oneDNN
# (bundled with torch) picks its kernels by the CPU's flags: with the weight reordered per call
# (nothing cached, so no second copy of the weights) it ran 1.5-2.3x faster than MKL there at
# umt5-small's shapes (10240 x 4096 at 512 rows: 238 -> 157 ms), same accuracy (~1e-6 relative to
# fp64). On a Xeon MKL is the faster one: the reorder alone costs oneDNN 8-25% (1024 x 512 @ 1024:
# 3.4 against 3.7 ms; 512 x 4096 @ 10240: 151 against 191 ms).
WIDE_GEMMS_IN_ONEDNN = (WIDE_GEMMS and _C.cpu_vendor() != "intel" and torch.backends.mkldnn.is_available()
                        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def wide_gemm_computes(x_dtype: torch.dtype, weight, rows: int) -> bool:
    """Whether ``linear`` runs this product as a wide fp32 GEMM (see above): fp32 x of ``rows`` rows
    with an fp32 weight, or with an int8 (weight-only), bf16 or fp16 weight expanded to fp32 for the
    call."""
    size_ok = 0 < weight.shape[0] * weight.shape[1] <= WIDE_GEMM_MAX_WEIGHT
    kind_ok = type(weight) is QuantizedWeight or (isinstance(weight, torch.Tensor)
                                                   and weight.dtype in (torch.float32, *_HALF_DTYPES))
    return wide_gemm_rows(x_dtype, rows) and size_ok and kind_ok


def wide_gemm_rows(x_dtype: torch.dtype, rows: int) -> bool:
    """Whether fp32 x of ``rows`` rows takes a wide GEMM with weights that qualify (see above);
    where oneDNN is the engine, only while torch.backends.mkldnn is enabled."""
    return (WIDE_GEMMS and x_dtype == torch.float32 and rows >= WIDE_GEMM_MIN_ROWS
            and (torch.backends.mkldnn.enabled or not WIDE_GEMMS_IN_ONEDNN))


def _wants_grad(x, weight) -> bool:
    """Whether autograd records this product: paths without autograd or with state kept between
    calls step aside then."""
    return torch.is_grad_enabled() and (x.requires_grad or getattr(weight, "requires_grad", False))


def _fp32_gemm(x, weight, rows):
    """``F.linear(x, weight)`` for fp32 operands, as a wide GEMM where that is faster (see above)."""
    if not wide_gemm_computes(x.dtype, weight, rows) or _wants_grad(x, weight):
        return F.linear(x, weight)  # (oneDNN's ops here have no autograd)
    return _wide_gemm(x.reshape(rows, x.shape[-1]).contiguous(), weight).view(*x.shape[:-1], weight.shape[0])


def _wide_gemm(x, weight):
    """``x @ weight.T`` (2-D fp32) in the engine ``WIDE_GEMMS_IN_ONEDNN`` names: oneDNN, the weight
    reordered into its layout for this call, or MKL."""
    if not WIDE_GEMMS_IN_ONEDNN:
        return F.linear(x, weight)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _half_linear_through_fp32(x, weight):
    """``F.linear`` of bf16 / fp16 ``x`` and a ``weight`` of its dtype, or weight-only int8 (as
    ``dequantize(torch.float32)``), as fp32 sums of the widened operands, rounded to x's dtype once;
    the weight widened a slice of output features at a time into this thread's buffer (into a fresh
    tensor when autograd records the product: a kept buffer would be overwritten under a graph that
    still needs it)."""
    out_features, in_features = weight.shape
    xf = x.reshape(-1, in_features).float()
    out = torch.empty(xf.shape[0], out_features, dtype=x.dtype)
    step = max(1, HALF_WIDEN_CHUNK // max(in_features, 1))
    buffer = None if _wants_grad(x, weight) else _widen_buffer(min(step, out_features) * in_features)
    for n in range(0, out_features, step):
        end = min(n + step, out_features)
        into = None if buffer is None else buffer[:(end - n) * in_features].view(end - n, in_features)
        if type(weight) is QuantizedWeight:
            widened = QuantizedWeight(weight.qweight[n:end], weight.scale[n:end]).dequantize(torch.float32, out=into)
        else:
            widened = weight[n:end].float() if into is None else into.copy_(weight[n:end])
        out[:, n:end] = F.linear(xf, widened)
    return out.view(*x.shape[:-1], out_features)


def _native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether torch's GEMM in ``dtype`` (bf16 / fp16) runs on that dtype's instructions (see above)."""
    return NATIVE_BF16_GEMM if dtype == torch.bfloat16 else NATIVE_FP16_GEMM


def _widen_buffer(numel: int) -> torch.Tensor:
    """This thread's fp32 widening buffer, grown to at least ``numel`` elements."""
    buffer = getattr(_widen_buffers, "fp32", None)
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: calls outside inference mode write it too
            buffer = _widen_buffers.fp32 = torch.empty(numel)
    return buffer


def _add_residual(y, residual):
    """``residual + y`` (eager's rule), in place in ``y`` when shape and dtype allow."""
    if residual is None:
        return y
    return y.add_(residual) if residual.shape == y.shape and residual.dtype == y.dtype else residual + y


def linear(x, weight, residual=None, out=None):
    _check_linear_args(x, weight)
    if residual is not None:
        _check_tensor("residual", residual)
        out_shape = (*x.shape[:-1], weight.shape[0])
        # By hand: torch.broadcast_shapes imports its symbolic-shape machinery (~25 MB) on first use.
        trailing = tuple(residual.shape[-len(out_shape):]) if out_shape else ()
        if residual.dim() > len(out_shape) or any(r not in (1, o) for r, o in zip(trailing[::-1], out_shape[::-1])):
            raise ValueError(f"residual {tuple(residual.shape)} does not broadcast to the output {out_shape}")
    quantized = isinstance(weight, QuantizedWeight)
    rows = math.prod(x.shape[:-1]) if x.dim() else 0
    small_fp32 = (not quantized and weight.dtype == x.dtype == torch.float32
                  and float_kernel_computes(x.dtype, weight.dtype, rows))
    if not quantized and weight.dtype == x.dtype and x.dtype in _HALF_DTYPES and rows > 0:
        if float_kernel_computes(x.dtype, weight.dtype, rows):
            # The C++ kernel on the exactly widened x: fp32 sums rounded once, as torch's GEMMs do.
            return _add_residual(linear(x.float(), weight).to(x.dtype), residual)
        if not _native_half_gemm(x.dtype):
            return _add_residual(_half_linear_through_fp32(x, weight), residual)
    if not quantized and weight.dtype == x.dtype == torch.float32 and not small_fp32 and rows > 0:
        return _add_residual(_fp32_gemm(x, weight, rows), residual)
    if (quantized or weight.dtype in _HALF_DTYPES) and wide_gemm_computes(x.dtype, weight, rows):
        dense = weight.dequantize(torch.float32) if quantized else weight.float()
        return _add_residual(_fp32_gemm(x, dense, rows), residual)
    if not quantized and weight.dtype == x.dtype and not small_fp32:
        return _add_residual(F.linear(x, weight), residual)
    out_features, in_features = weight.shape
    out_shape = (*x.shape[:-1], out_features)
    kernel_weight = quantized or weight.dtype in (torch.float32, *_HALF_DTYPES)
    residual_fits = residual is None or (residual.shape == out_shape and residual.dtype == x.dtype)
    # W8A8 sums of more than 65536 products could overflow the kernels' int32 accumulators.
    int32_fits = not isinstance(weight, W8A8Weight) or in_features <= 65536
    # 8-bit weights with a bf16 / fp16 model's x: the C++ kernels on the exactly widened x, rounded
    # once to x's dtype. W8A8 at any size: its activations are quantised to int8 anyway (exactly
    # what the eager reference does, not the fp64 reference). Weight-only int8 for decode-sized
    # rows, where eager would expand the whole weight on every call (umt5-small's greedy decoding
    # in bf16 12x slower); more rows take torch's GEMM in x's dtype where it runs on its
    # instructions (eager: the weight expanded to x's dtype), else its fp32 GEMM on the widened x
    # and the weight expanded to fp32 a slice at a time, rounded once (an umt5-small encoder at
    # 8x128 on an Ice Lake Xeon: bf16 709 -> 228 ms, fp16 2347 -> 255).
    through_fp32 = (int32_fits and x.numel() > 0 if isinstance(weight, W8A8Weight)
                    else quantized and int8_kernel_computes(x.dtype, rows))
    if through_fp32 and x.dtype != torch.float32:
        return _add_residual(linear(x.float(), weight).to(x.dtype), residual)
    if type(weight) is QuantizedWeight and x.dtype in _HALF_DTYPES and rows > 0 and not _native_half_gemm(x.dtype):
        return _add_residual(_half_linear_through_fp32(x, weight), residual)
    if not (kernel_weight and x.dtype == torch.float32 and int32_fits) or x.numel() == 0:
        return eager.linear(x, weight, residual)
    if not residual_fits:  # (e.g. an fp16 model's fp16 residual stream meeting its fp32 `wo`): eager's add
        return _add_residual(kernel_linear(x, weight), residual)
    return kernel_linear(x, weight, residual, out=out)


def kernel_linear(x, weight, residual=None, out=None):
    """``linear`` in the C++ kernels whatever the row count (fp32 x; an fp32, bf16, fp16, int8 or W8A8
    weight; a residual of the output's shape): the computation ``linear`` picks for decode-sized
    rows, whose sums for one row and column depend on no other row or column. The result goes into
    ``out`` where that is a contiguous fp32 CPU tensor of its shape (else into fresh memory): an LM
    head's fresh [rows, 256384] logits cost page faults on every step (~15 ms of a 64-row product's
    ~100 on an Ice Lake Xeon)."""
    if x.dtype != torch.float32 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"kernel_linear takes fp32 x [..., {weight.shape[1]}], got {x.dtype} {tuple(x.shape)}")
    rows = math.prod(x.shape[:-1])
    out_features, in_features = weight.shape
    out_shape = (*x.shape[:-1], out_features)
    quantized = isinstance(weight, QuantizedWeight)
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    reusable = (isinstance(out, torch.Tensor) and out.shape == out_shape and out.dtype == torch.float32
                and out.device == x.device and out.is_contiguous())
    y = out if reusable else x.new_empty(out_shape)
    sizes = dict(residual=_ptr(residual), y=y.data_ptr(), rows=rows, in_features=in_features,
                 out_features=out_features, num_threads=_threads())
    if quantized:
        # Tensors held by names until the call returns (a temporary's memory would be freed first).
        qweight, scale = weight.qweight.contiguous(), weight.scale.float().contiguous()
        if isinstance(weight, W8A8Weight):
            _C.w8a8_linear(x=x.data_ptr(), qweight=qweight.data_ptr(), row_layout=isinstance(weight, W8A8RowWeight),
                           scale=scale.data_ptr(), **sizes)
        else:
            _C.int8_linear(x=x.data_ptr(), qweight=qweight.data_ptr(), scale=scale.data_ptr(), **sizes)
    else:
        float_linear = {torch.float32: _C.f32_linear, torch.bfloat16: _C.bf16_linear,
                        torch.float16: _C.fp16_linear}[weight.dtype]
        weight = weight.contiguous()
        float_linear(x=x.data_ptr(), weight=weight.data_ptr(), **sizes)
    return y


def gated_ffn_in(x, w_gate, w_up, activation):
    if activation not in eager.ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {', '.join(sorted(eager.ACTIVATIONS))}")
    kernel_activation = _KERNEL_ACTIVATIONS.get(activation)
    if kernel_activation is None or x.dtype not in (torch.float32, *_HALF_DTYPES):
        return eager.gated_ffn_in(x, w_gate, w_up, activation, linear=linear)
    h = linear(x, w_gate).contiguous()
    up = None if w_up is None else linear(x, w_up).contiguous()
    if up is not None and up.shape != h.shape:
        raise ValueError(f"w_gate and w_up must have one shape, got {tuple(w_gate.shape)} and "
                         f"{tuple(w_up.shape)}")
    if h.numel() == 0 or h.dtype != x.dtype or (up is not None and up.dtype != x.dtype):
        return eager.ACTIVATIONS[activation](h) if up is None else eager.ACTIVATIONS[activation](h) * up
    cols = h.shape[-1]
    # bf16 / fp16: computed in fp32 and rounded once (eager rounds after every elementwise op)
    kernel = {torch.float32: _C.gated_activation, torch.bfloat16: _C.gated_activation_bf16,
              torch.float16: _C.gated_activation_fp16}[h.dtype]
    kernel(activation=kernel_activation, a=h.data_ptr(), a_row_stride=cols, b=_ptr(up), b_row_stride=cols,
           out=h.data_ptr(), out_row_stride=cols, rows=h.numel() // cols, cols=cols, num_threads=_threads())
    return h
