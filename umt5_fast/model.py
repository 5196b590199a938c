"""The UMT5 model, top to bottom: norm, attention, feed-forward, blocks, stacks, task heads.

Module names follow transformers' checkpoint keys (``encoder.block.0.layer.0.SelfAttention.q``),
so a checkpoint loads by name. Every hot operation goes through ``self.runtime.ops`` (eager, cpu or
triton, see ``umt5_fast.ops``); the math is the same whichever backend runs it. Inference only:
there is no dropout and no training path.
"""
import math
import threading
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from umt5_fast import buckets, validation
from umt5_fast.cache import DynamicCache, StaticCache
from umt5_fast.config import UMT5Config
from umt5_fast.ops import eager, get_ops
from umt5_fast.outputs import (BaseModelOutput, BaseModelOutputWithPastAndCrossAttentions, as_encoder_output,
                               Seq2SeqLMOutput, Seq2SeqModelOutput,
                               Seq2SeqQuestionAnsweringModelOutput,
                               Seq2SeqSequenceClassifierOutput, TokenClassifierOutput)
from umt5_fast.quant import PackedWeight, QuantizedWeight, w8a8_format


class Runtime:
    """The ops object shared by every module of one model; ``set_backend`` swaps it in place."""

    # Packed weights expand into one reused buffer per thread: a fresh allocation of a layer's
    # expanded weight costs more in page faults than the expansion itself. Bigger ones (an 8-bit
    # LM head) are allocated per call rather than kept resident.
    EXPANSION_BUFFER_MAX_BYTES = 256 << 20

    def __init__(self, backend: str = "auto", device="cpu"):
        self.backend = backend
        self.ops = get_ops(backend, device)
        self._thread_state = threading.local()

    @property
    def ops(self):
        # torch.jit.trace records torch ops only: the C++ kernels write through raw pointers, so a
        # traced graph would replay uninitialised outputs. Tracing runs the eager ops (same math).
        if self._ops.name == "cpu" and torch.jit.is_tracing():
            return eager
        return self._ops

    @ops.setter
    def ops(self, ops):
        self._ops = ops

    # copy.deepcopy / pickle (torch.save of a whole model): the ops module and the per-thread
    # buffers are rebuilt, not copied.
    def __getstate__(self):
        return {"backend": self.backend, "ops_name": self._ops.name}

    def __setstate__(self, state):
        self.backend = state["backend"]
        self.ops = get_ops(state["ops_name"], "cuda" if state["ops_name"] == "triton" else "cpu")
        self._thread_state = threading.local()

    def expansion_buffer(self, shape, dtype: torch.dtype, device, slot: int = 0) -> Optional[torch.Tensor]:
        """A contiguous ``shape`` x ``dtype`` tensor to expand a packed weight into, valid until the
        next call for the same ``slot`` from this thread (weights used together take different
        slots); None when it would exceed ``EXPANSION_BUFFER_MAX_BYTES``."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.EXPANSION_BUFFER_MAX_BYTES:
            return None
        device = torch.device(device)
        buffers = self._thread_state.__dict__.setdefault("buffers", {})
        buffer = buffers.get(slot)
        if buffer is None or buffer.device != device or buffer.numel() < nbytes:
            buffer = buffers[slot] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return buffer[:nbytes].view(dtype).view(shape)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
class HoldsPackedWeight(nn.Module):
    """A module whose packed weight lives in the buffers ``qweight`` and ``qscale``: ``.to(dtype)`` /
    ``.half()`` move them but keep the scales' dtype (fp32 for int8, as the checkpoint for fp8 /
    GGUF): rounded to fp16 / bf16 they would change every dequantised weight."""

    def _apply(self, fn, *args, **kwargs):
        scale = getattr(self, "qscale", None)
        result = super()._apply(fn, *args, **kwargs)
        if scale is not None and self.qscale is not None and self.qscale.dtype != scale.dtype:
            self.qscale = scale.to(self.qscale.device)
        return result


class Linear(HoldsPackedWeight):
    """``y = x @ W.T (+ b)``; W is a float parameter or a packed 8-bit weight (``umt5_fast.quant``):
    int8 + scales after ``quantize_int8``, or fp8 / GGUF Q8_0 as a checkpoint stores them."""

    def __init__(self, in_features: int, out_features: int, runtime: Runtime, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.runtime = runtime
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.register_buffer("qweight", None)
        self.register_buffer("qscale", None)
        self.packed_format = QuantizedWeight  # the PackedWeight class that qweight + qscale make up

    def packed_weight(self):
        if self.qweight is not None:
            return self.packed_format(self.qweight, self.qscale)
        return self.weight

    def load_packed(self, packed: PackedWeight):
        """Hold ``packed`` in place of the float weight (buffers, so ``.to(device)`` moves it)."""
        self.weight = None
        self.packed_format = type(packed)
        self.qweight, self.qscale = packed.qweight, packed.scale

    def quantize_int8(self, activations: bool = False):
        """int8 weights; ``activations``: also quantise activations at run time (``W8A8Weight``, in
        the layout the selected CPU kernels multiply faster)."""
        self.load_packed((w8a8_format() if activations else QuantizedWeight).quantize(self.weight))

    def kernel_weight(self, dtype: torch.dtype, slot: int = 0):
        """The weight as the ops take it: a float tensor or an int8 ``QuantizedWeight`` (both in the
        ops contract); other packed formats are expanded to ``dtype`` here, one layer at a time, so
        no backend has to know them (into the runtime's reused buffer ``slot``)."""
        weight = self.packed_weight()
        if isinstance(weight, (torch.Tensor, QuantizedWeight)):
            return weight
        return weight.dequantize(dtype, out=self.runtime.expansion_buffer(weight.shape, dtype, weight.device, slot))

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.qweight.dtype if self.qweight is not None else self.weight.dtype

    def forward(self, x, residual=None, out=None):
        """``out``: memory the backend may write the product into (``ops.linear``); without a bias."""
        weight = self.kernel_weight(x.dtype)
        if self.bias is not None and isinstance(weight, torch.Tensor) and weight.dtype == x.dtype:
            # the task heads (the only layers with a bias, off the hot path): one rounding of the biased
            # product, as transformers' F.linear rounds it (in bf16 / fp16 adding b after rounds twice)
            y = F.linear(x, weight, self.bias.to(x.dtype))
            return y if residual is None else residual + y
        y = self.runtime.ops.linear(x, weight, None if self.bias is not None else residual,
                                    out=None if self.bias is not None else out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
            if residual is not None:
                y = residual + y
        return y


class RMSNorm(nn.Module):
    """T5LayerNorm: scale by the root mean square (fp32 variance); no mean, no bias."""

    def __init__(self, d_model: int, eps: float, runtime: Runtime):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model), requires_grad=False)
        self.eps = eps
        self.runtime = runtime

    def forward(self, x):
        return self.runtime.ops.rms_norm(x, self.weight, self.eps)


def frozen_embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """An embedding table left uninitialised: weights always come from a checkpoint (and random
    initialisation on the meta device would pull in torch's decomposition machinery, ~150 MB)."""
    return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim), _freeze=True)


class PackedEmbedding(HoldsPackedWeight):
    """A token embedding kept as a checkpoint stores it in 8 bits (a GGUF Q8_0 ``token_embd``: half the
    bytes of bf16 for umt5-xxl's 256384 x 4096 table); a lookup expands only the rows it reads, to
    ``dtype``. Same interface as the ``nn.Embedding`` it replaces, except that there is no ``weight``."""

    def __init__(self, packed: PackedWeight, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = packed.shape
        self.packed_format = type(packed)
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("qscale", packed.scale)
        self.dtype = dtype

    def packed_weight(self) -> PackedWeight:
        return self.packed_format(self.qweight, self.qscale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.packed_weight().rows(ids.reshape(-1)).dequantize(self.dtype)
        return rows.view(*ids.shape, self.embedding_dim)


def table_device_dtype(table) -> tuple:
    """Device and dtype of the vectors an ``nn.Embedding`` or a ``PackedEmbedding`` returns."""
    if isinstance(table, PackedEmbedding):
        return table.qweight.device, table.dtype
    return table.weight.device, table.weight.dtype


def clamp_fp16(h: torch.Tensor) -> torch.Tensor:
    """transformers' guard against fp16 overflow in T5 (inf becomes a large finite value)."""
    if h.dtype != torch.float16:
        return h
    max_value = torch.finfo(torch.float16).max
    clamp_value = torch.where(torch.isinf(h).any(), max_value - 1000, max_value)
    return torch.clamp(h, min=-clamp_value, max=clamp_value)


class Attention(nn.Module):
    """Multi-head attention without 1/sqrt(d) scaling; self-attention owns a bias table."""

    def __init__(self, config: UMT5Config, runtime: Runtime, has_relative_bias: bool,
                 bidirectional: bool):
        super().__init__()
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = Linear(config.d_model, inner, runtime)
        self.k = Linear(config.d_model, inner, runtime)
        self.v = Linear(config.d_model, inner, runtime)
        self.o = Linear(inner, config.d_model, runtime)
        self.relative_attention_bias = (frozen_embedding(config.relative_attention_num_buckets, config.num_heads)
                                        if has_relative_bias else None)
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.runtime = runtime

    def heads(self, x):
        """``[B, L, H*D]`` -> ``[B, H, L, D]`` view."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.d_kv).transpose(1, 2)

    def bias_table(self):
        return None if self.relative_attention_bias is None else self.relative_attention_bias.weight

    def forward(self, x, residual, *, kv_source=None, key_padding_mask=None, causal=False, cache=None,
                layer_idx=0, past_length=0, want_weights=False, head_mask=None, additive_mask=None):
        """Return ``(residual + attention(x), attention probabilities or None)``.

        ``kv_source``: encoder states for cross-attention (K/V cached once per layer in ``cache``);
        ``additive_mask``: transformers' 4-D mask, added to the scores (eager path).
        """
        batch, length = x.shape[:2]
        q = self.heads(self.q(x))
        if kv_source is None:
            k, v = self.heads(self.k(x)), self.heads(self.v(x))
            if cache is not None:
                k, v = cache.update(layer_idx, k, v, past_length)
        elif cache is not None and cache.cross_kv[layer_idx] is not None:
            k, v = cache.cross_kv[layer_idx]
        else:
            k, v = self.heads(self.k(kv_source)), self.heads(self.v(kv_source))
            if cache is not None:  # owned, contiguous copies, as the caches keep (DynamicCache.update)
                k, v = cache.cross_kv[layer_idx] = (k.contiguous(), v.contiguous())
        if kv_source is None and isinstance(past_length, int):  # (a CUDA graph replays a tensor)
            buckets.check_distance(max(past_length + length, k.shape[2]) - 1, self.num_buckets,
                                   self.max_distance, self.bidirectional)
        options = dict(bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                       max_distance=self.max_distance, key_padding_mask=key_padding_mask,
                       causal=causal, query_offset=past_length if kv_source is None else 0)
        probs = None
        ops = self.runtime.ops
        if want_weights or head_mask is not None or additive_mask is not None:
            # The fused kernels never form the probabilities nor add a 4-D mask: the eager path.
            probs = eager.attention_probs(q, k, self.bias_table(), additive_mask=additive_mask, **options)
            if head_mask is not None:
                probs = probs * head_mask
            out = torch.matmul(probs, v).transpose(1, 2)
        elif isinstance(cache, StaticCache) and kv_source is None and length == 1:
            k_buffer, v_buffer = cache.layer_buffers(layer_idx)
            out = ops.decode_attention(q, k_buffer, v_buffer, past_length + 1, self.bias_table(),
                                       num_buckets=self.num_buckets, max_distance=self.max_distance,
                                       key_padding_mask=key_padding_mask)
        else:
            out = ops.attention(q, k, v, self.bias_table(), **options)
        out = out.reshape(batch, length, self.num_heads * self.d_kv)
        return self.o(out, residual=residual), (probs if want_weights else None)


class SelfAttentionLayer(nn.Module):
    def __init__(self, config, runtime, bidirectional: bool):
        super().__init__()
        self.SelfAttention = Attention(config, runtime, has_relative_bias=True, bidirectional=bidirectional)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, runtime)

    def forward(self, h, **kwargs):
        return self.SelfAttention(self.layer_norm(h), h, **kwargs)


class CrossAttentionLayer(nn.Module):
    def __init__(self, config, runtime):
        super().__init__()
        self.EncDecAttention = Attention(config, runtime, has_relative_bias=False, bidirectional=True)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, runtime)

    def forward(self, h, **kwargs):
        return self.EncDecAttention(self.layer_norm(h), h, **kwargs)


class FeedForward(nn.Module):
    """``wo(act(wi_0 x) * wi_1 x)`` (gated) or ``wo(act(wi x))``; ``wo`` may stay fp32 in fp16 models."""

    def __init__(self, config: UMT5Config, runtime: Runtime):
        super().__init__()
        self.gated = config.is_gated_act
        if self.gated:
            self.wi_0 = Linear(config.d_model, config.d_ff, runtime)
            self.wi_1 = Linear(config.d_model, config.d_ff, runtime)
        else:
            self.wi = Linear(config.d_model, config.d_ff, runtime)
        self.wo = Linear(config.d_ff, config.d_model, runtime)
        self.activation = config.dense_act_fn
        self.runtime = runtime

    def forward(self, x, residual):
        gate, up = (self.wi_0, self.wi_1) if self.gated else (self.wi, None)
        h = self.runtime.ops.gated_ffn_in(x, gate.kernel_weight(x.dtype),
                                          None if up is None else up.kernel_weight(x.dtype, slot=1), self.activation)
        if self.wo.weight_dtype == torch.float32 and h.dtype != torch.float32:
            h = h.float()  # transformers' fp16 rule: `wo` kept in fp32 computes in fp32
        return self.wo(h, residual=residual)


class FeedForwardLayer(nn.Module):
    def __init__(self, config, runtime):
        super().__init__()
        self.DenseReluDense = FeedForward(config, runtime)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, runtime)

    def forward(self, h):
        return self.DenseReluDense(self.layer_norm(h), h)


class EncoderBlock(nn.Module):
    def __init__(self, config, runtime):
        super().__init__()
        self.layer = nn.ModuleList([SelfAttentionLayer(config, runtime, bidirectional=True),
                                    FeedForwardLayer(config, runtime)])

    def forward(self, h, key_padding_mask, want_weights, head_mask):
        h, weights = self.layer[0](h, key_padding_mask=key_padding_mask, want_weights=want_weights,
                                   head_mask=head_mask)
        h = clamp_fp16(h)
        return clamp_fp16(self.layer[1](h)), weights


class DecoderBlock(nn.Module):
    def __init__(self, config, runtime):
        super().__init__()
        self.layer = nn.ModuleList([SelfAttentionLayer(config, runtime, bidirectional=False),
                                    CrossAttentionLayer(config, runtime),
                                    FeedForwardLayer(config, runtime)])

    def forward(self, h, *, self_mask, encoder_states, encoder_mask, cache, layer_idx, past_length,
                want_weights, head_mask, cross_head_mask):
        # a 4-D mask (transformers' additive form) stands in for the causal and padding masks
        masks = (dict(additive_mask=self_mask) if self_mask is not None and self_mask.dim() == 4
                 else dict(key_padding_mask=self_mask, causal=True))
        h, self_weights = self.layer[0](h, cache=cache, layer_idx=layer_idx, past_length=past_length,
                                        want_weights=want_weights, head_mask=head_mask, **masks)
        h = clamp_fp16(h)
        cross_weights = None
        if encoder_states is not None:
            h, cross_weights = self.layer[1](h, kv_source=encoder_states, key_padding_mask=encoder_mask,
                                             cache=cache, layer_idx=layer_idx, want_weights=want_weights,
                                             head_mask=cross_head_mask)
            h = clamp_fp16(h)
        return clamp_fp16(self.layer[2](h)), self_weights, cross_weights


def layer_head_masks(head_mask, num_layers: int, num_heads: int, dtype) -> List[Optional[torch.Tensor]]:
    """transformers' ``get_head_mask``: ``[H]`` or ``[layers, H]`` -> per layer ``[1, H, 1, 1]``."""
    if head_mask is None:
        return [None] * num_layers
    if head_mask.dim() == 1 and head_mask.shape[0] == num_heads:
        head_mask = head_mask.unsqueeze(0).expand(num_layers, -1)
    if head_mask.dim() != 2 or tuple(head_mask.shape) != (num_layers, num_heads):
        raise ValueError(f"head_mask must have shape [num_heads={num_heads}] or [num_layers={num_layers}, "
                         f"num_heads={num_heads}], got {tuple(head_mask.shape)}")
    return [m.to(dtype)[None, :, None, None] for m in head_mask]


# ---------------------------------------------------------------------------------------------
# Stacks
# ---------------------------------------------------------------------------------------------
def output_choices(config, output_attentions, output_hidden_states, return_dict):
    """forward's output flags, None standing for the config's (as in transformers)."""
    return (config.output_attentions if output_attentions is None else output_attentions,
            config.output_hidden_states if output_hidden_states is None else output_hidden_states,
            config.use_return_dict if return_dict is None else return_dict)


class EncoderStack(nn.Module):
    def __init__(self, config: UMT5Config, embed_tokens: nn.Embedding, runtime: Runtime):
        super().__init__()
        self.config = config
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList([EncoderBlock(config, runtime) for _ in range(config.num_layers)])
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, runtime)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, head_mask=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, use_cache=None):
        if use_cache:
            raise ValueError("use_cache=True needs the decoder: the encoder keeps no cache")
        output_attentions, output_hidden_states, return_dict = output_choices(
            self.config, output_attentions, output_hidden_states, return_dict)
        h = embed(self.embed_tokens, input_ids, inputs_embeds, "input_ids", "inputs_embeds")
        mask = validation.check_mask("attention_mask", attention_mask, h.shape[:2], h.device)
        head_masks = layer_head_masks(head_mask, len(self.block), self.config.num_heads, h.dtype)
        hidden_states, attentions = [], []
        for block, block_head_mask in zip(self.block, head_masks):
            if output_hidden_states:
                hidden_states.append(h)
            h, weights = block(h, mask, output_attentions, block_head_mask)
            if output_attentions:
                attentions.append(weights)
        h = self.final_layer_norm(h)
        if output_hidden_states:
            hidden_states.append(h)
        out = BaseModelOutput(last_hidden_state=h, hidden_states=tuple(hidden_states) if output_hidden_states else None,
                              attentions=tuple(attentions) if output_attentions else None)
        return out if return_dict else out.to_tuple()


class DecoderStack(nn.Module):
    def __init__(self, config: UMT5Config, embed_tokens: nn.Embedding, runtime: Runtime):
        super().__init__()
        self.config = config
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList([DecoderBlock(config, runtime) for _ in range(config.num_decoder_layers)])
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, runtime)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, past_key_values=None, use_cache=None, head_mask=None,
                cross_attn_head_mask=None, output_attentions=None, output_hidden_states=None, return_dict=None):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_attentions, output_hidden_states, return_dict = output_choices(
            self.config, output_attentions, output_hidden_states, return_dict)
        h = embed(self.embed_tokens, input_ids, inputs_embeds, "decoder_input_ids", "decoder_inputs_embeds")
        cache = as_cache(past_key_values, self.config, h.dtype, h.device)
        if cache is None and use_cache:
            cache = DynamicCache(len(self.block))
        past_length = cache.get_seq_length() if cache is not None else 0
        batch, length = h.shape[:2]
        if past_length:
            validation.same_batch("decoder inputs", batch, "past_key_values", cache.batch_size())
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
            self_mask = validation.check_additive_mask("decoder_attention_mask", attention_mask,
                                                       (batch, self.config.num_heads, length, past_length + length),
                                                       h.device)
        else:
            self_mask = validation.check_mask("decoder_attention_mask", attention_mask,
                                              (batch, past_length + length), h.device)
        encoder_mask = None
        if encoder_hidden_states is not None:
            # Not required finite: a model's own encoder may give NaN (as transformers' does, it flows on).
            validation.check_embeds("encoder_outputs (last_hidden_state)", encoder_hidden_states, self.config.d_model,
                                    h.device, h.dtype, require_finite=False)
            validation.same_batch("decoder inputs", batch, "encoder outputs", encoder_hidden_states.shape[0])
            encoder_mask = validation.check_mask("attention_mask", encoder_attention_mask,
                                                 encoder_hidden_states.shape[:2], h.device)
            # cached cross-attention K/V stand in for the encoder states (as in transformers): the
            # mask must then cover them
            cached = cache.cross_kv[0] if cache is not None and cache.cross_kv else None
            if cached is not None and encoder_mask is not None and cached[0].shape[2] != encoder_mask.shape[1]:
                raise ValueError(f"past_key_values holds cross-attention K/V of {cached[0].shape[2]} encoder "
                                 f"positions, but attention_mask covers {encoder_mask.shape[1]}: pass the cache "
                                 "that decoding this input returned")
        num_layers, num_heads = len(self.block), self.config.num_heads
        out = self.run(h, self_mask=self_mask, encoder_states=encoder_hidden_states, encoder_mask=encoder_mask,
                       cache=cache, past_length=past_length,
                       head_masks=layer_head_masks(head_mask, num_layers, num_heads, h.dtype),
                       cross_head_masks=layer_head_masks(cross_attn_head_mask, num_layers, num_heads, h.dtype),
                       output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        if cache is not None:
            cache.length = past_length + length
        if is_transformers_cache(past_key_values):
            # transformers updates the cache object it is given: loops that pass one object on rely on it
            write_back(past_key_values, cache, past_length)
            cache = past_key_values
        # (a cache that was passed in is returned even with use_cache=False, as transformers returns it)
        out.past_key_values = cache if use_cache or past_key_values is not None else None
        return out if return_dict else out.to_tuple()

    def run(self, h, *, self_mask, encoder_states, encoder_mask, cache, past_length, head_masks=None,
            cross_head_masks=None, output_attentions=False, output_hidden_states=False):
        """The layers on validated inputs (embedded ``h``); generation calls this once per step.

        Writes K/V of positions ``past_length..`` into ``cache``; the caller advances ``cache.length``
        (``past_length`` may be a device tensor when a CUDA graph replays the step)."""
        head_masks = head_masks or [None] * len(self.block)
        cross_head_masks = cross_head_masks or [None] * len(self.block)
        hidden_states, attentions, cross_attentions = [], [], []
        for i, block in enumerate(self.block):
            if output_hidden_states:
                hidden_states.append(h)
            h, self_weights, cross_weights = block(
                h, self_mask=self_mask, encoder_states=encoder_states, encoder_mask=encoder_mask,
                cache=cache, layer_idx=i, past_length=past_length, want_weights=output_attentions,
                head_mask=head_masks[i], cross_head_mask=cross_head_masks[i])
            if output_attentions:
                attentions.append(self_weights)
                cross_attentions.append(cross_weights)
        h = self.final_layer_norm(h)
        if output_hidden_states:
            hidden_states.append(h)
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=h, past_key_values=cache,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            cross_attentions=tuple(cross_attentions) if output_attentions and encoder_states is not None
            else None)


def embed(table: nn.Embedding, ids, embeds, ids_name: str, embeds_name: str) -> torch.Tensor:
    if (ids is None) == (embeds is None):
        raise ValueError(f"pass exactly one of {ids_name} and {embeds_name}")
    device, dtype = table_device_dtype(table)
    if embeds is not None:
        if isinstance(embeds, torch.Tensor) and embeds.dtype == torch.float32 and dtype in (torch.bfloat16,
                                                                                          torch.float16):
            # transformers takes them too: its first RMSNorm casts to the weights' dtype (its residual
            # stream then stays fp32; ours is the model's dtype from here, as with the model's own embeddings)
            embeds = embeds.to(dtype)
        validation.check_embeds(embeds_name, embeds, table.embedding_dim, device, dtype)
        return embeds
    validation.check_ids(ids_name, ids, table.num_embeddings, device)
    return table(ids.long())


def is_transformers_cache(past_key_values) -> bool:
    """A transformers Cache object (EncoderDecoderCache, DynamicCache): told apart without importing
    transformers."""
    return hasattr(past_key_values, "to_legacy_cache") and not isinstance(past_key_values, DynamicCache)


def as_cache(past_key_values, config: UMT5Config, dtype: torch.dtype, device):
    """Accept our caches, transformers' legacy tuples, or a transformers Cache object (an empty one
    starts a new cache)."""
    if past_key_values is None or isinstance(past_key_values, (DynamicCache, StaticCache)):
        return past_key_values
    if is_transformers_cache(past_key_values):
        check_layer_capacity(past_key_values, config.num_decoder_layers)
        if past_key_values.get_seq_length() == 0:  # e.g. EncoderDecoderCache(DynamicCache(config=...), ...)
            return DynamicCache(config.num_decoder_layers)
        past_key_values = past_key_values.to_legacy_cache()
    validation.check_legacy_cache(past_key_values, config.num_decoder_layers, config.num_heads, config.d_kv,
                                  dtype, device)
    return DynamicCache.from_legacy_cache(past_key_values)


def transformers_cache_parts(target):
    """(self-attention part, cross-attention part or None) of a transformers EncoderDecoderCache, or
    (the cache, None) for a plain DynamicCache."""
    return getattr(target, "self_attention_cache", target), getattr(target, "cross_attention_cache", None)


def check_layer_capacity(target, num_layers: int):
    """Refuse a transformers cache that cannot hold every decoder layer before anything is written to
    it. ``DynamicCache(config=...)`` makes a fixed list of ``config.num_layers`` layers: the encoder's
    count, fewer than a decoder with more layers writes (transformers then fails with an IndexError)."""
    for part in transformers_cache_parts(target):
        layers = getattr(part, "layers", None)
        if layers is not None and getattr(part, "layer_class_to_replicate", None) is None \
                and len(layers) < num_layers:
            raise ValueError(
                f"past_key_values ({type(part).__name__}) holds {len(layers)} layers and cannot grow, but the "
                f"decoder has {num_layers}: DynamicCache(config=...) sizes itself by config.num_layers (the "
                "encoder's); pass DynamicCache() (which grows) or None")


def write_back(target, cache: DynamicCache, past_length: int):
    """Append the positions this call added to a transformers cache object (its EncoderDecoderCache's
    self-attention part, or a plain DynamicCache), and the cross-attention K/V it did not hold yet."""
    self_part, cross_part = transformers_cache_parts(target)
    updated = getattr(target, "is_updated", {})
    for layer, (keys, values) in enumerate(cache.self_kv):
        self_part.update(keys[:, :, past_length:], values[:, :, past_length:], layer)
        if cross_part is not None and cache.cross_kv[layer] is not None and not updated.get(layer, False):
            cross_part.update(*cache.cross_kv[layer], layer)
            updated[layer] = True


# ---------------------------------------------------------------------------------------------
# Task models
# ---------------------------------------------------------------------------------------------
class UMT5PreTrainedModel(nn.Module):
    """Shared plumbing: config, backend, dtype/device, loading and saving."""
    config_class = UMT5Config
    _generates = False  # whether the class has generate()

    def __init__(self, config: UMT5Config, backend: str = "auto"):
        super().__init__()
        if not isinstance(config, UMT5Config):
            raise TypeError(f"config must be a umt5_fast.UMT5Config, got {type(config).__name__}")
        self.config = config
        self.runtime = Runtime(backend)
        from umt5_fast.generation import settings_from_model_config
        # generation_config.json's, when a checkpoint has one (set by from_pretrained); else derived
        # from the config, as transformers derives it
        self.generation_config = settings_from_model_config(config) if self._generates else None

    main_input_name = "input_ids"
    base_model_prefix = "transformer"

    @property
    def backend(self) -> str:
        return self.runtime.ops.name

    def train(self, mode: bool = True):
        """Inference only: train mode (dropout) is refused rather than silently running without
        dropout; ``eval()`` (``train(False)``) works."""
        if mode:
            raise NotImplementedError("umt5_fast is inference-only: train mode (dropout, gradients) is not "
                                      "implemented; train with transformers and load the checkpoint here")
        return super().train(False)

    @classmethod
    def can_generate(cls) -> bool:
        return cls._generates

    @property
    def base_model(self):
        return getattr(self, "transformer", self)

    @property
    def name_or_path(self) -> str:
        return self.config.name_or_path

    def set_backend(self, backend: str):
        """Switch every module to the ops of ``backend`` ("auto", "triton", "cpu", "eager")."""
        new = Runtime(backend, self.device)
        self.runtime.backend, self.runtime.ops = new.backend, new.ops
        return self

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        if self.runtime.backend == "auto":  # re-pick the best backend for the new device
            self.runtime.ops = get_ops("auto", self.device)
        return result

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, embedding: nn.Embedding):
        """Use ``embedding`` (``[vocab_size, d_model]``) for every stack, as transformers does."""
        if not isinstance(embedding, nn.Embedding) or tuple(embedding.weight.shape) != (
                self.config.vocab_size, self.config.d_model):
            raise ValueError(f"set_input_embeddings takes an nn.Embedding of shape "
                             f"({self.config.vocab_size}, {self.config.d_model})")
        inner = getattr(self, "transformer", None)  # the classifiers wrap a base model
        if inner is not None:
            inner.set_input_embeddings(embedding)
            return
        self.shared = embedding
        for stack in (getattr(self, "encoder", None), getattr(self, "decoder", None)):
            if stack is not None:
                stack.embed_tokens = embedding

    def get_output_embeddings(self):
        return getattr(self, "lm_head", None)

    def set_output_embeddings(self, new_embeddings):
        """Use ``new_embeddings``' weight (an ``nn.Linear`` or our ``Linear`` without bias, ``[vocab_size,
        d_model]``) as the LM head, as transformers replaces its ``lm_head``."""
        head = getattr(self, "lm_head", None)
        if head is None:
            raise AttributeError(f"{type(self).__name__} has no LM head")
        weight = getattr(new_embeddings, "weight", None)
        shape = (self.config.vocab_size, self.config.d_model)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != shape \
                or getattr(new_embeddings, "bias", None) is not None:
            raise ValueError(f"set_output_embeddings takes a linear layer without bias whose weight has shape {shape}")
        if weight.dtype != self.dtype or weight.device != self.device:
            raise ValueError(f"set_output_embeddings: the weight is {weight.dtype} on {weight.device}, the model "
                             f"{self.dtype} on {self.device}")
        head.qweight = head.qscale = None
        head.packed_format = QuantizedWeight
        head.weight = nn.Parameter(weight.detach(), requires_grad=False)  # (shares the caller's storage)

    def tie_weights(self):
        """As transformers: with ``tie_word_embeddings``, the LM head reads the input embedding (again,
        e.g. after ``set_input_embeddings``); a head packed by ``quantize`` stays as it is."""
        head = getattr(self, "lm_head", None)
        if head is not None and self.config.tie_word_embeddings and head.qweight is None \
                and isinstance(self.shared, nn.Embedding):
            head.weight = self.shared.weight

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters (and 8-bit packed weights, counted as the entries they hold), as transformers
        counts them."""
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings \
            else set()
        params = [p for p in self.parameters() if (not only_trainable or p.requires_grad) and id(p) not in embeddings]
        packed = [] if only_trainable else [m.packed_weight() for m in self.modules()
                                              if isinstance(m, Linear) and m.qweight is not None]
        return sum(p.numel() for p in params) + sum(math.prod(w.shape) for w in packed)

    def resize_token_embeddings(self, *args, **kwargs):
        raise NotImplementedError("umt5_fast is inference-only: resize the embeddings with transformers, "
                                  "save_pretrained, and load that checkpoint")

    def _shift_right(self, input_ids):
        start, pad = self.config.decoder_start_token_id, self.config.pad_token_id
        if start is None:
            raise ValueError("config.decoder_start_token_id has to be defined (UMT5 uses the pad id)")
        if pad is None:
            raise ValueError("config.pad_token_id has to be defined")
        shifted = input_ids.new_zeros(input_ids.shape)
        shifted[..., 1:] = input_ids[..., :-1].clone()
        shifted[..., 0] = start
        shifted.masked_fill_(shifted == -100, pad)
        return shifted

    def prepare_decoder_input_ids_from_labels(self, labels):
        return self._shift_right(labels)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """Load a transformers checkpoint directory; see ``umt5_fast.loading.from_pretrained``."""
        from umt5_fast.loading import from_pretrained
        return from_pretrained(cls, path, **kwargs)

    @classmethod
    def from_hf(cls, hf_model, backend: str = "auto"):
        """Convert a live transformers UMT5 model (same weights, our kernels)."""
        from umt5_fast.loading import from_hf
        return from_hf(cls, hf_model, backend=backend)

    def save_pretrained(self, directory, max_shard_size=None, safe_serialization: bool = True,
                        is_main_process: bool = True, push_to_hub: bool = False, state_dict=None,
                        variant=None, token=None, save_peft_format: bool = True):
        """Write a directory transformers loads (safetensors; ``safe_serialization=False`` is refused:
        pickled ``.bin`` files run code when loaded). ``state_dict``: these tensors instead of the
        model's; ``variant``: the weights' file names carry it ("model.fp16.safetensors"); ``token``
        and ``save_peft_format`` (hub and adapter options) change nothing."""
        if push_to_hub:
            raise NotImplementedError("umt5_fast does not upload: save_pretrained here, then push with huggingface_hub")
        if not safe_serialization:
            raise ValueError("save_pretrained writes safetensors only (safe_serialization=True)")
        if not is_main_process:
            return
        from umt5_fast.loading import save_pretrained
        save_pretrained(self, directory, max_shard_size=max_shard_size, state_dict=state_dict, variant=variant)


def _encode(model, input_ids, attention_mask, inputs_embeds, head_mask, encoder_outputs,
            output_attentions, output_hidden_states) -> BaseModelOutput:
    """Run the encoder, or wrap user-given encoder outputs (a tuple or an output object)."""
    if encoder_outputs is None:
        return model.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                             head_mask=head_mask, output_attentions=output_attentions,
                             output_hidden_states=output_hidden_states, return_dict=True)
    return as_encoder_output(encoder_outputs)


class _EncoderDecoder(UMT5PreTrainedModel):
    """``shared`` embedding + encoder + decoder, as in UMT5Model / ForConditionalGeneration / QA."""

    def __init__(self, config: UMT5Config, backend: str = "auto"):
        super().__init__(config, backend)
        self.shared = frozen_embedding(config.vocab_size, config.d_model)
        self.encoder = EncoderStack(config, self.shared, self.runtime)
        self.decoder = DecoderStack(config, self.shared, self.runtime)

    def get_encoder(self):
        return self.encoder

    def get_decoder(self):
        return self.decoder

    def _seq2seq(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, head_mask,
                 decoder_head_mask, cross_attn_head_mask, encoder_outputs, past_key_values, inputs_embeds,
                 decoder_inputs_embeds, use_cache, output_attentions, output_hidden_states):
        enc = _encode(self, input_ids, attention_mask, inputs_embeds, head_mask, encoder_outputs,
                      output_attentions, output_hidden_states)
        dec = self.decoder(input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
                           inputs_embeds=decoder_inputs_embeds, encoder_hidden_states=enc.last_hidden_state,
                           encoder_attention_mask=attention_mask, past_key_values=past_key_values,
                           use_cache=use_cache, head_mask=decoder_head_mask,
                           cross_attn_head_mask=cross_attn_head_mask, output_attentions=output_attentions,
                           output_hidden_states=output_hidden_states, return_dict=True)
        return enc, dec


def _seq2seq_fields(enc: BaseModelOutput, dec: BaseModelOutputWithPastAndCrossAttentions) -> dict:
    return dict(past_key_values=dec.past_key_values, decoder_hidden_states=dec.hidden_states,
                decoder_attentions=dec.attentions, cross_attentions=dec.cross_attentions,
                encoder_last_hidden_state=enc.last_hidden_state, encoder_hidden_states=enc.hidden_states,
                encoder_attentions=enc.attentions)


class UMT5Model(_EncoderDecoder):
    """Encoder-decoder returning the decoder's last hidden state."""

    @torch.no_grad()
    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                head_mask=None, decoder_head_mask=None, cross_attn_head_mask=None, encoder_outputs=None,
                past_key_values=None, inputs_embeds=None, decoder_inputs_embeds=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, cache_position=None):
        output_attentions, output_hidden_states, return_dict = output_choices(
            self.config, output_attentions, output_hidden_states, return_dict)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        enc, dec = self._seq2seq(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                                 head_mask, decoder_head_mask, cross_attn_head_mask, encoder_outputs,
                                 past_key_values, inputs_embeds, decoder_inputs_embeds, use_cache,
                                 output_attentions, output_hidden_states)
        out = Seq2SeqModelOutput(last_hidden_state=dec.last_hidden_state, **_seq2seq_fields(enc, dec))
        return out if return_dict else out.to_tuple()


class UMT5ForConditionalGeneration(_EncoderDecoder):
    """Encoder-decoder with the LM head (untied in UMT5 checkpoints); ``generate`` decodes."""
    _generates = True

    # Greedy decoding on the cpu backend finds the argmax through an int8 copy of the LM head (fp32,
    # bf16 or weight-only int8; ``umt5_fast.lm_head_screen``: same ids, a quarter of a float head's
    # bytes per step; the copy is built at the first greedy ``generate``). False: every step
    # computes all logits.
    screen_lm_head = True

    def __init__(self, config: UMT5Config, backend: str = "auto"):
        super().__init__(config, backend)
        self.lm_head = Linear(config.d_model, config.vocab_size, self.runtime)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def lm_head_input(self, decoder_hidden: torch.Tensor) -> torch.Tensor:
        if self.config.scale_decoder_outputs:
            return decoder_hidden * (self.config.d_model ** -0.5)
        return decoder_hidden

    def logits(self, decoder_hidden: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The LM head's output; ``out``: memory it may be written into (``ops.linear``)."""
        return self.lm_head(self.lm_head_input(decoder_hidden), out=out)

    @torch.no_grad()
    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                head_mask=None, decoder_head_mask=None, cross_attn_head_mask=None, encoder_outputs=None,
                past_key_values=None, inputs_embeds=None, decoder_inputs_embeds=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                cache_position=None):
        output_attentions, output_hidden_states, return_dict = output_choices(
            self.config, output_attentions, output_hidden_states, return_dict)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if labels is not None:
            decoder_shape = (decoder_input_ids.shape if decoder_input_ids is not None
                             else None if decoder_inputs_embeds is None else decoder_inputs_embeds.shape[:2])
            validation.check_labels(labels, self.config.vocab_size, decoder_shape)
            if decoder_shape is None:
                decoder_input_ids = self._shift_right(labels)
        enc, dec = self._seq2seq(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                                 head_mask, decoder_head_mask, cross_attn_head_mask, encoder_outputs,
                                 past_key_values, inputs_embeds, decoder_inputs_embeds, use_cache,
                                 output_attentions, output_hidden_states)
        logits = self.logits(dec.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1).long(), ignore_index=-100)
        out = Seq2SeqLMOutput(loss=loss, logits=logits, **_seq2seq_fields(enc, dec))
        return out if return_dict else out.to_tuple()

    def generate(self, input_ids=None, **kwargs):
        """Greedy, beam or sampled decoding with a static KV cache; see ``umt5_fast.generation``."""
        from umt5_fast.generation import generate
        return generate(self, input_ids, **kwargs)

    def compute_transition_scores(self, sequences, scores, beam_indices=None, normalize_logits: bool = False):
        """Each generated token's score at its step, as transformers computes it from ``generate``'s
        ``sequences``, ``scores`` (or ``logits``) and, for beam search, ``beam_indices``."""
        from umt5_fast.generation import transition_scores
        return transition_scores(sequences, scores, beam_indices, self.config.vocab_size, normalize_logits)


class UMT5EncoderModel(UMT5PreTrainedModel):
    """The encoder alone (e.g. the umt5-xxl text encoder of video pipelines)."""

    def __init__(self, config: UMT5Config, backend: str = "auto"):
        super().__init__(config, backend)
        self.shared = frozen_embedding(config.vocab_size, config.d_model)
        self.encoder = EncoderStack(config, self.shared, self.runtime)

    def get_encoder(self):
        return self.encoder

    def set_packed_embedding(self, embedding: PackedEmbedding):
        """Use an 8-bit token embedding as stored (an encoder alone reads it by rows only)."""
        self.shared = self.encoder.embed_tokens = embedding

    @torch.no_grad()
    def forward(self, input_ids=None, attention_mask=None, head_mask=None, inputs_embeds=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        output_attentions, output_hidden_states, return_dict = output_choices(
            self.config, output_attentions, output_hidden_states, return_dict)
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                           head_mask=head_mask, output_attentions=output_attentions,
                           output_hidden_states=output_hidden_states, return_dict=True)
        return out if return_dict else out.to_tuple()


class ClassificationHead(nn.Module):
    """dense -> tanh -> out_proj over the last <eos> representation."""

    def __init__(self, config: UMT5Config, runtime: Runtime):
        super().__init__()
        self.dense = Linear(config.d_model, config.d_model, runtime, bias=True)
        self.out_proj = Linear(config.d_model, config.num_labels, runtime, bias=True)

    def forward(self, h):
        return self.out_proj(torch.tanh(self.dense(h)))


class UMT5ForSequenceClassification(UMT5PreTrainedModel):
    def __init__(self, config: UMT5Config, backend: str = "auto"):
        super().__init__(config, backend)
        self.transformer = UMT5Model(config, backend)
        _share_runtime(self.transformer, self.runtime)
        self.classification_head = ClassificationHead(config, self.runtime)

    def get_encoder(self):
        return self.transformer.encoder

    @property
    def shared(self):
        return self.transformer.shared

    @torch.no_grad()
    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                head_mask=None, decoder_head_mask=None, cross_attn_head_mask=None, encoder_outputs=None,
                inputs_embeds=None, decoder_inputs_embeds=None, labels=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        output_attentions, output_hidden_states, return_dict = output_choices(
            self.config, output_attentions, output_hidden_states, return_dict)
        if labels is not None:
            use_cache = False
        if input_ids is None and inputs_embeds is not None:
            raise NotImplementedError("UMT5ForSequenceClassification needs input_ids (it pools at <eos> tokens)")
        if input_ids is None:
            raise ValueError("UMT5ForSequenceClassification needs input_ids")
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(input_ids)
        out = self.transformer(input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                               decoder_attention_mask=decoder_attention_mask, head_mask=head_mask,
                               decoder_head_mask=decoder_head_mask, cross_attn_head_mask=cross_attn_head_mask,
                               encoder_outputs=encoder_outputs, inputs_embeds=inputs_embeds,
                               decoder_inputs_embeds=decoder_inputs_embeds, use_cache=use_cache,
                               output_attentions=output_attentions,
                               output_hidden_states=output_hidden_states, return_dict=True)
        sequence_output = out.last_hidden_state
        eos_mask = input_ids.eq(self.config.eos_token_ids[0] if self.config.eos_token_ids else -1)
        counts = eos_mask.sum(1)
        if eos_mask.shape != sequence_output.shape[:2]:
            raise ValueError("UMT5ForSequenceClassification pools the decoder output at the <eos> positions of "
                             "input_ids, so decoder inputs must have the same length as input_ids")
        if torch.unique_consecutive(counts).numel() != 1:
            raise ValueError("All examples must have the same number of <eos> tokens.")
        if int(counts[0]) < 1:
            raise ValueError("Each example must contain at least one <eos> token.")
        batch, _, hidden = sequence_output.shape
        sentence = sequence_output[eos_mask, :].view(batch, -1, hidden)[:, -1, :]
        logits = self.classification_head(sentence)
        loss = None
        if labels is not None:
            loss = self._classification_loss(logits, labels)
        result = Seq2SeqSequenceClassifierOutput(
            loss=loss, logits=logits, past_key_values=out.past_key_values,
            decoder_hidden_states=out.decoder_hidden_states, decoder_attentions=out.decoder_attentions,
            cross_attentions=out.cross_attentions, encoder_last_hidden_state=out.encoder_last_hidden_state,
            encoder_hidden_states=out.encoder_hidden_states, encoder_attentions=out.encoder_attentions)
        return result if return_dict else result.to_tuple()

    def _classification_loss(self, logits, labels):
        num_labels = self.config.num_labels
        if self.config.problem_type is None:  # decided once, like transformers
            if num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            if num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
            return F.mse_loss(logits, labels.to(logits.dtype))
        if self.config.problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class UMT5ForTokenClassification(UMT5PreTrainedModel):
    def __init__(self, config: UMT5Config, backend: str = "auto"):
        super().__init__(config, backend)
        self.transformer = UMT5EncoderModel(config, backend)
        _share_runtime(self.transformer, self.runtime)
        self.classifier = Linear(config.d_model, config.num_labels, self.runtime, bias=True)

    def get_encoder(self):
        return self.transformer.encoder

    @property
    def shared(self):
        return self.transformer.shared

    @torch.no_grad()
    def forward(self, input_ids=None, attention_mask=None, head_mask=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        output_attentions, output_hidden_states, return_dict = output_choices(
            self.config, output_attentions, output_hidden_states, return_dict)
        if labels is not None:
            inputs = input_ids if input_ids is not None else inputs_embeds
            validation.check_labels(labels, self.config.num_labels, None if inputs is None else inputs.shape[:2])
        out = self.transformer(input_ids, attention_mask=attention_mask, head_mask=head_mask,
                               inputs_embeds=inputs_embeds, output_attentions=output_attentions,
                               output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1).long())
        if not return_dict:
            # transformers' tuple for this class: (loss?, logits, encoder tuple[2:-1]), a slice that
            # holds neither hidden states nor attentions (always empty); kept for drop-in unpacking
            output = (logits, out.to_tuple()[2:-1])
            return ((loss,) + output) if loss is not None else output
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                     attentions=out.attentions)


class UMT5ForQuestionAnswering(_EncoderDecoder):
    def __init__(self, config: UMT5Config, backend: str = "auto"):
        super().__init__(config, backend)
        self.qa_outputs = Linear(config.d_model, config.num_labels, self.runtime, bias=True)

    @torch.no_grad()
    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                head_mask=None, decoder_head_mask=None, cross_attn_head_mask=None, encoder_outputs=None,
                start_positions=None, end_positions=None, inputs_embeds=None, decoder_inputs_embeds=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None):
        output_attentions, output_hidden_states, return_dict = output_choices(
            self.config, output_attentions, output_hidden_states, return_dict)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if start_positions is not None and end_positions is not None:
            use_cache = False
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise ValueError("If no decoder_input_ids or decoder_inputs_embeds are passed, input_ids "
                                 "cannot be None (the decoder reads the shifted input_ids)")
            decoder_input_ids = self._shift_right(input_ids)
        enc, dec = self._seq2seq(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                                 head_mask, decoder_head_mask, cross_attn_head_mask, encoder_outputs, None,
                                 inputs_embeds, decoder_inputs_embeds, use_cache, output_attentions,
                                 output_hidden_states)
        logits = self.qa_outputs(dec.last_hidden_state)
        if logits.shape[-1] != 2:
            raise ValueError(f"UMT5ForQuestionAnswering needs config.num_labels == 2 (start, end), "
                             f"got {logits.shape[-1]}")
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            if start_positions.dim() > 1:
                start_positions = start_positions.squeeze(-1)
            if end_positions.dim() > 1:
                end_positions = end_positions.squeeze(-1)
            ignored = start_logits.size(1)
            start_positions, end_positions = start_positions.clamp(0, ignored), end_positions.clamp(0, ignored)
            loss = (F.cross_entropy(start_logits, start_positions, ignore_index=ignored)
                    + F.cross_entropy(end_logits, end_positions, ignore_index=ignored)) / 2
        out = Seq2SeqQuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                                  **_seq2seq_fields(enc, dec))
        return out if return_dict else out.to_tuple()


def _share_runtime(module: nn.Module, runtime: Runtime):
    """Point every submodule of a wrapped model at the outer model's runtime."""
    for sub in module.modules():
        if hasattr(sub, "runtime"):
            sub.runtime = runtime


MODEL_CLASSES = {cls.__name__: cls for cls in (UMT5Model, UMT5ForConditionalGeneration, UMT5EncoderModel,
                                               UMT5ForSequenceClassification, UMT5ForTokenClassification,
                                               UMT5ForQuestionAnswering)}
