"""Plain-torch ops: the readable specification every kernel is tested against.

Op order and dtypes follow transformers' modeling_umt5.py so that fp32 results agree to rounding.
"""
import math

import torch
import torch.nn.functional as F

from umt5_fast.buckets import position_bias
from umt5_fast.ops import MASKED_SCORE
from umt5_fast.quant import QuantizedWeight, W8A8Weight

name = "eager"


def rms_norm(x, weight, eps):
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)
    return weight * x


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_python_tanh(x):
    # transformers' GELUTanh(use_gelu_tanh_python=True): gelu_new's terms in another order
    return x * 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0))))


def _laplace(x, mu=0.707107, sigma=0.282095):
    return 0.5 * (1.0 + torch.erf((x - mu).div(sigma * math.sqrt(2.0))))


# transformers' ACT2FN entries, each with its op order (fp32 results agree to rounding); the two
# with learned parameters (prelu, xielu) have no place in a T5 FFN checkpoint.
ACTIVATIONS = {
    "gelu_new": _gelu_new,
    "gelu_accurate": _gelu_new,
    "gelu_python_tanh": _gelu_python_tanh,
    "gelu_python": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_10": lambda x: torch.clip(F.gelu(x), -10.0, 10.0),
    "relu2": lambda x: torch.square(F.relu(x)),
    "laplace": _laplace,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "mish": F.mish,
    "linear": lambda x: x,
}


def _weight_as(weight, dtype):
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


def linear(x, weight, residual=None, out=None):  # (out: a hint eager does not take)
    if isinstance(weight, W8A8Weight):
        y = weight.linear(x).to(x.dtype)
    else:
        y = F.linear(x, _weight_as(weight, x.dtype))
    return y if residual is None else residual + y


def argmax(scores):
    return scores.argmax(-1)


def log_softmax(scores, out=None):
    return torch.log_softmax(scores, dim=-1, out=out)


def top_k(scores, k):
    return torch.topk(scores, k, dim=-1)


def log_softmax_top_k(logits, k, banned=()):
    log_probs = log_softmax(logits)
    if len(banned):
        log_probs[:, list(banned)] = -math.inf
    return top_k(log_probs, k)


def gated_ffn_in(x, w_gate, w_up, activation, linear=linear):
    """``act(x @ w_gate.T) * (x @ w_up.T)``; ``linear``: another backend's linear, for a backend that
    keeps this op's activation math but runs the projections itself."""
    h = ACTIVATIONS[activation](linear(x, w_gate))
    return h if w_up is None else h * linear(x, w_up)


def attention_scores(q, k, bias_table, *, bidirectional, num_buckets, max_distance,
                     key_padding_mask=None, causal=False, query_offset=0, scale=1.0, additive_mask=None):
    """Pre-softmax scores ``[B, H, Lq, Lk]`` with bias and masks applied (the eager reference).
    ``additive_mask`` (``[B or 1, H or 1, Lq, >= Lk]``, transformers' 4-D decoder mask) is added to
    the bias, as transformers adds it."""
    scores = torch.matmul(q, k.transpose(-1, -2))
    if scale != 1.0:
        scores = scores * scale
    lq, lk = q.shape[-2], k.shape[-2]
    query_positions = torch.arange(lq, device=q.device) + query_offset
    if bias_table is not None or additive_mask is not None:
        bias = 0.0 if bias_table is None else position_bias(bias_table, query_positions, lk, bidirectional,
                                                             num_buckets, max_distance)
        if additive_mask is not None:
            bias = bias + additive_mask[..., :lk]
        scores = scores + bias.to(scores.dtype)
    masked = None
    if key_padding_mask is not None:
        masked = ~key_padding_mask.bool()[:, None, None, :]
    if causal:
        future = torch.arange(lk, device=q.device)[None, :] > query_positions[:, None]
        masked = future[None, None] if masked is None else masked | future[None, None]
    if masked is not None:
        scores = scores.float().masked_fill(masked, MASKED_SCORE).to(scores.dtype) \
            if scores.dtype != torch.float16 else scores.masked_fill(masked, torch.finfo(torch.float16).min)
    return scores


def _softmax(scores):
    return F.softmax(scores.float(), dim=-1).type_as(scores)


def attention_probs(q, k, bias_table, **kwargs):
    return _softmax(attention_scores(q, k, bias_table, **kwargs))


def attention(q, k, v, bias_table, **kwargs):
    probs = attention_probs(q, k, bias_table, **kwargs)
    return torch.matmul(probs, v).transpose(1, 2).contiguous()


def decode_attention(q, k_cache, v_cache, cache_length, bias_table, *, num_buckets, max_distance,
                     key_padding_mask=None):
    if isinstance(cache_length, torch.Tensor):
        # length on the device (a CUDA graph replays this): score the whole buffer, no host sync;
        # positions not written yet get no weight at all
        scores = attention_scores(q, k_cache, bias_table, bidirectional=False, num_buckets=num_buckets,
                                  max_distance=max_distance, query_offset=cache_length - 1,
                                  key_padding_mask=None if key_padding_mask is None
                                  else key_padding_mask[:, :k_cache.shape[2]])
        unwritten = torch.arange(k_cache.shape[2], device=q.device) >= cache_length
        probs = _softmax(scores.masked_fill(unwritten, -math.inf))
        return torch.matmul(probs, v_cache).transpose(1, 2).contiguous()
    length = int(cache_length)
    mask = None if key_padding_mask is None else key_padding_mask[:, :length]
    return attention(q, k_cache[:, :, :length], v_cache[:, :, :length], bias_table,
                     bidirectional=False, num_buckets=num_buckets, max_distance=max_distance,
                     key_padding_mask=mask, causal=True, query_offset=length - 1)
