"""The cpu backend's single-token decode step as one C++ call (``csrc/decoder_step.cpp``).

At batch 1 a decode step of umt5-small reads ~90 MB of decoder weights in ~3 ms, and the ~100
Python-level op calls of ``DecoderStack.run`` cost about as much again. ``CpuDecodeStep`` hands
the C++ side pointers to every decoder weight once per ``generate`` call; each step then runs the
whole stack (same kernels, same order, so the same bits as the Python path) and returns the final
hidden states. It covers what the cpu backend's kernels cover: fp32 activations with fp32, bf16,
fp16, int8 or W8A8 linear weights, or a bf16 / fp16 model's activations with weights of their
dtype, int8 or W8A8 (an fp16 model's `wo` also fp32, as transformers keeps it; attention on bf16
products where the CPU has AVX512-BF16, else the fp32 kernel reading the half-precision cache and
encoder K/V as they are, as the Python path's); linears without bias; norms in the activations'
dtype; activations with a C++ kernel. Anything else (``build`` returns None, or ``accepts`` says
no) takes the Python path, which is also the specification this one is tested against.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from umt5_fast import buckets
from umt5_fast.cache import StaticCache
from umt5_fast.quant import QuantizedWeight, W8A8RowWeight, W8A8Weight

try:  # the extension is optional: without it there is no cpu backend either
    from umt5_fast.ops import cpu as cpu_ops
except ImportError:
    cpu_ops = None

_NONE, _F32, _BF16, _INT8, _W8A8, _W8A8_ROWS, _F16 = -1, 0, 1, 2, 3, 4, 5
_NO_LINEAR = (_NONE, 0, 0, 0, 0)
_FLOAT_KINDS = {torch.float32: _F32, torch.bfloat16: _BF16, torch.float16: _F16}


def _linear_spec(linear, keep: list, activations: torch.dtype, fp32_ok: bool = False):
    """``(kind, weight ptr, scale ptr, in, out)`` of a decoder ``Linear``, or None when no C++
    kernel takes it as ``ops.cpu.linear`` would for ``activations`` (fp32 x: fp32, bf16, fp16, int8
    or W8A8 weights; a bf16 / fp16 model's x: weights of its dtype, int8 or W8A8, on the widened x;
    ``fp32_ok``: an fp16 model's fp32 `wo` too, whose x the model widens). ``keep`` holds the
    tensors the pointers need."""
    if linear.bias is not None:
        return None
    weight = linear.packed_weight()
    if isinstance(weight, torch.Tensor):
        kind = _FLOAT_KINDS.get(weight.dtype)
        own_kind = weight.dtype == activations or (fp32_ok and activations == torch.float16 and kind == _F32)
        if kind is None or (activations != torch.float32 and not own_kind):
            return None
        weight = weight.contiguous()
        keep.append(weight)
        return kind, weight.data_ptr(), 0, weight.shape[1], weight.shape[0]
    if type(weight) not in (QuantizedWeight, W8A8Weight, W8A8RowWeight) or weight.qweight.dtype != torch.int8:
        return None  # fp8 / GGUF blocks are expanded per call by Linear.kernel_weight
    kind = {QuantizedWeight: _INT8, W8A8Weight: _W8A8, W8A8RowWeight: _W8A8_ROWS}[type(weight)]
    qweight, scale = weight.qweight.contiguous(), weight.scale.float().contiguous()
    keep.extend((qweight, scale))
    return kind, qweight.data_ptr(), scale.data_ptr(), weight.shape[1], weight.shape[0]


def _norm_weight(norm, eps: float, keep: list, activations: torch.dtype):
    """Pointer to an RMSNorm's weight in the activations' dtype, or None when the step cannot run
    it (another dtype, or another ``eps`` than the step's one)."""
    if norm.weight.dtype != activations or norm.eps != eps:
        return None
    weight = norm.weight.contiguous()
    keep.append(weight)
    return weight.data_ptr()


class CpuDecodeStep:
    def __init__(self, model, native, dtype: torch.dtype, kinds: set, keep: list):
        self.model = model
        self.native = native
        self.dtype = dtype  # of the activations: fp32, or a bf16 / fp16 model's
        self.kinds = kinds  # the weight kinds of the linears
        self._keep = keep  # the tensors behind the pointers ``native`` holds

    def _rows_take_the_kernels(self, rows: int) -> bool:
        """Whether ``ops.cpu.linear`` multiplies ``rows`` rows with every weight in the kernels the
        step runs (and attention takes the kernel the step runs)."""
        # fp32 weights take the C++ GEMV only up to some rows (torch's GEMM above; an fp16 model's
        # fp32 `wo` multiplies fp32 x)
        fp32_ok = _F32 not in self.kinds or cpu_ops.float_kernel_computes(torch.float32, torch.float32, rows)
        if self.dtype != torch.float32:
            # half-precision / int8 weights take the C++ kernels only up to some rows (a GEMM above)
            own = _FLOAT_KINDS[self.dtype]
            return (fp32_ok and (own not in self.kinds or cpu_ops.float_kernel_computes(self.dtype, self.dtype, rows))
                    and (_INT8 not in self.kinds or cpu_ops.int8_kernel_computes(self.dtype, rows)))
        # half-precision / int8 weights are expanded for a wide GEMM from WIDE_GEMM_MIN_ROWS rows on
        return fp32_ok and not (self.kinds & {_BF16, _F16, _INT8} and cpu_ops.wide_gemm_rows(torch.float32, rows))

    def accepts(self, tokens: torch.Tensor, cache, encoder_states: torch.Tensor) -> bool:
        """Whether this step (``tokens`` ``[rows, 1]``) runs here, exactly as the Python path would."""
        rows = tokens.shape[0]
        return (tokens.shape[1] == 1 and rows > 0 and isinstance(cache, StaticCache)
                and 0 < cache.length < cache.capacity and cache.keys.dtype == self.dtype
                and cache.keys.shape == cache.values.shape and cache.keys.shape[1] == rows
                and cache.keys.is_contiguous() and cache.values.is_contiguous()
                and encoder_states.dtype == self.dtype and encoder_states.shape[0] == rows
                and self._rows_take_the_kernels(rows)
                and all(kv is not None and kv[0].dtype == kv[1].dtype == self.dtype
                        and kv[0].shape == kv[1].shape and kv[0].shape[0] == rows
                        and kv[0].stride(-1) == kv[1].stride(-1) == 1 for kv in cache.cross_kv))

    def run(self, tokens: torch.Tensor, cache: StaticCache, encoder_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Final hidden states ``[rows, d_model]`` of the step; writes its K/V at ``cache.length``."""
        decoder = self.model.decoder
        rows = tokens.shape[0]
        hidden = F.embedding(tokens[:, 0], decoder.embed_tokens.weight).contiguous()
        out = torch.empty_like(hidden)
        cross_k = [kv[0] for kv in cache.cross_kv]
        cross_v = [kv[1] for kv in cache.cross_kv]
        source_length = cross_k[0].shape[2]
        mask = cpu_ops._check_key_padding_mask(encoder_mask, rows, source_length)
        self.native.run(hidden=hidden.data_ptr(), out=out.data_ptr(), rows=rows, position=cache.length,
                        keys=cache.keys.data_ptr(), values=cache.values.data_ptr(),
                        cache_strides=cache.keys.stride()[:4],
                        cross_k=[k.data_ptr() for k in cross_k], k_strides=[k.stride()[:3] for k in cross_k],
                        cross_v=[v.data_ptr() for v in cross_v], v_strides=[v.stride()[:3] for v in cross_v],
                        source_length=source_length, encoder_mask=0 if mask is None else mask.data_ptr(),
                        mask_stride=0 if mask is None else mask.stride(0),
                        num_threads=torch.get_num_threads())
        return out


def build(model) -> Optional[CpuDecodeStep]:
    """The C++ step for ``model`` as it is now (weights, dtypes, backend), or None when it does
    not cover the model. Build it again after changing the model."""
    if cpu_ops is None or model.runtime.ops is not cpu_ops:
        return None
    config, decoder = model.config, model.decoder
    activation = cpu_ops._KERNEL_ACTIVATIONS.get(config.dense_act_fn)
    if activation is None or not isinstance(decoder.embed_tokens, torch.nn.Embedding):
        return None
    dtype = decoder.embed_tokens.weight.dtype
    if dtype not in _FLOAT_KINDS:
        return None
    keep, layers, kinds = [], [], set()
    eps = decoder.final_layer_norm.eps
    for block in decoder.block:
        self_attention, cross_attention = block.layer[0].SelfAttention, block.layer[1].EncDecAttention
        ffn = block.layer[2].DenseReluDense
        gate, up = (ffn.wi_0, ffn.wi_1) if ffn.gated else (ffn.wi, None)
        linears = [_linear_spec(lin, keep, dtype) for lin in (self_attention.q, self_attention.k, self_attention.v,
                                                              self_attention.o, cross_attention.q, cross_attention.o,
                                                              gate)]
        linears.append(_NO_LINEAR if up is None else _linear_spec(up, keep, dtype))
        linears.append(_linear_spec(ffn.wo, keep, dtype, fp32_ok=True))
        norms = [_norm_weight(sub.layer_norm, eps, keep, dtype) for sub in block.layer]
        if any(spec is None for spec in linears) or any(ptr is None for ptr in norms):
            return None
        table = self_attention.bias_table().to(torch.float32).contiguous()
        keep.append(table)
        kinds.update(spec[0] for spec in linears if spec[0] != _NONE)
        layers.append(((norms[0], table.data_ptr(), norms[1], norms[2]), linears))
    final_norm = _norm_weight(decoder.final_layer_norm, eps, keep, dtype)
    if final_norm is None or not layers:
        return None
    distance_buckets = buckets.distance_buckets(config.relative_attention_num_buckets,
                                                config.relative_attention_max_distance, False)
    keep.append(distance_buckets)
    native = cpu_ops._C.DecoderStep(
        d_model=config.d_model, heads=config.num_heads, d_kv=config.d_kv, d_ff=config.d_ff,
        num_buckets=config.relative_attention_num_buckets, max_distance=config.relative_attention_max_distance,
        distance_buckets=distance_buckets.data_ptr(), eps=eps, activation=activation, layers=layers, final_norm=final_norm, activations=str(dtype).removeprefix("torch."))
    return CpuDecodeStep(model, native, dtype, kinds, keep)
