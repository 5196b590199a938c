"""The Triton backend of the ops contract (see ``umt5_fast.ops``): kernels from ``umt5_fast.kernels``.

Each function hands the calls its kernels do not cover to ``umt5_fast.ops.eager``:

* tensors not on a CUDA device (unless Triton's interpreter is on, as in the CPU test suite);
* dtypes other than fp32/fp16/bf16, or operands of different dtypes (``linear`` with an fp32
  ``wo`` under fp16 activations, a residual of another dtype): the kernels multiply operands of one
  dtype, and eager defines what the mixed case computes;
* ``QuantizedWeight`` (int8) weights in ``linear`` and ``gated_ffn_in``;
* activations without a fused epilogue (``umt5_fast.kernels.gated_ffn.ACTIVATIONS`` lists those
  with one: gelu_new, gelu_pytorch_tanh, gelu, relu, silu/swish);
* attention head dims above ``MAX_HEAD_DIM`` (128), or q/k/v whose last dim is not contiguous.

Attention makes its bias with ``bias_mode="distance"`` (a ``[H, Lq + Lk - 1]`` vector, then a gather
per score), which spends no transcendental per score; ``benchmarks/bench_attention.py`` times it
against the per-score ``"bucket"`` mode.
"""
import torch

from umt5_fast.kernels import interpreted
from umt5_fast.kernels import attention as attention_kernel
from umt5_fast.kernels import decode_attention as decode_kernel
from umt5_fast.kernels import gated_ffn as gated_ffn_kernel
from umt5_fast.kernels import rms_norm as rms_norm_kernel
from umt5_fast.ops import eager
from umt5_fast.quant import QuantizedWeight

name = "triton"

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels_run(*tensors) -> bool:
    """Whether the kernels can take these tensors: float tensors of one kernel dtype on a CUDA device
    (any device under the interpreter). ``None`` entries (optional operands) are ignored."""
    present = [t for t in tensors if t is not None]
    if any(isinstance(t, QuantizedWeight) for t in present):
        return False
    if not all(t.dtype == present[0].dtype for t in present) or present[0].dtype not in _KERNEL_DTYPES:
        return False
    return interpreted() or all(t.device.type == "cuda" for t in present)


argmax = eager.argmax  # one read of the logits: torch's reduction is as good as a kernel on a GPU
log_softmax = eager.log_softmax  # likewise
top_k = eager.top_k
log_softmax_top_k = eager.log_softmax_top_k


def rms_norm(x, weight, eps):
    if not (_kernels_run(x) and _kernels_run(weight)):
        return eager.rms_norm(x, weight, eps)
    return rms_norm_kernel.rms_norm(x, weight, eps)


def _attention_fits(q, k, v):
    return (_kernels_run(q, k, v) and q.shape[-1] <= attention_kernel.MAX_HEAD_DIM
            and all(t.stride(-1) == 1 for t in (q, k, v)))


def attention(q, k, v, bias_table, *, bidirectional, num_buckets, max_distance, key_padding_mask=None,
              causal=False, query_offset=0, scale=1.0):
    kwargs = dict(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance,
                  key_padding_mask=key_padding_mask, causal=causal, query_offset=query_offset, scale=scale)
    if not _attention_fits(q, k, v):
        return eager.attention(q, k, v, bias_table, **kwargs)
    return attention_kernel.attention(q, k, v, bias_table, bias_mode="distance", **kwargs)


def decode_attention(q, k_cache, v_cache, cache_length, bias_table, *, num_buckets, max_distance,
                     key_padding_mask=None):
    if not _attention_fits(q, k_cache, v_cache):
        return eager.decode_attention(q, k_cache, v_cache, cache_length, bias_table, num_buckets=num_buckets,
                                      max_distance=max_distance, key_padding_mask=key_padding_mask)
    return decode_kernel.decode_attention(q, k_cache, v_cache, cache_length, bias_table, num_buckets=num_buckets,
                                          max_distance=max_distance, key_padding_mask=key_padding_mask)


def gated_ffn_in(x, w_gate, w_up, activation):
    if activation not in gated_ffn_kernel.ACTIVATIONS or not _kernels_run(x, w_gate, w_up):
        return eager.gated_ffn_in(x, w_gate, w_up, activation)
    return gated_ffn_kernel.gated_ffn_in(x, w_gate, w_up, activation)


def linear(x, weight, residual=None, out=None):  # (out: a hint the GPU path does not take)
    if not _kernels_run(x, weight, residual):
        return eager.linear(x, weight, residual)
    return gated_ffn_kernel.linear(x, weight, residual)
