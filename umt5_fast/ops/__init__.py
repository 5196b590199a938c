"""The hot operations of the model, behind one interface with three implementations.

``eager`` (plain torch: the specification of the math), ``cpu`` (C++ kernels in ``csrc/``) and
``triton`` (kernels in ``kernels/``) each provide the functions below with the same signatures.
The model asks its ops object and never branches on the backend itself; a backend that cannot do
a given call (a dtype, an activation) hands it to ``eager`` itself.

Contract (shapes; every tensor on one device; inputs were validated at the API boundary):

``rms_norm(x, weight, eps) -> y``
    T5LayerNorm: ``x * rsqrt(mean(x.float()**2) + eps)``, cast to ``weight.dtype`` when that is
    fp16/bf16, times ``weight``. ``x``: ``[..., d_model]``.

``attention(q, k, v, bias_table, *, bidirectional, num_buckets, max_distance,
            key_padding_mask=None, causal=False, query_offset=0, scale=1.0) -> out``
    ``q``: ``[B, H, Lq, D]``, ``k``/``v``: ``[B, H, Lk, D]`` (any strides, last dim contiguous).
    Score of (query i, key j) = ``scale * q_i . k_j + bias_table[bucket(j - (i + query_offset)), h]``
    with ``bucket`` = ``umt5_fast.buckets.relative_position_bucket``; ``bias_table`` is the layer's
    ``[num_buckets, H]`` table or None (cross-attention: no bias). A key is *masked* when
    ``key_padding_mask[b, j]`` is False or (``causal`` and ``j > i + query_offset``); a masked
    key's score is replaced by the finite ``MASKED_SCORE`` (what transformers' additive
    ``finfo.min`` mask amounts to in fp32), so a query row whose keys are all masked averages V
    uniformly, exactly like transformers. Softmax in fp32. ``out``: ``[B, Lq, H, D]`` contiguous
    in ``q.dtype`` (the layout the output projection reads without a copy).

``decode_attention(q, k_cache, v_cache, cache_length, bias_table, *, num_buckets, max_distance,
                   key_padding_mask=None) -> out``
    One query row per sequence at position ``cache_length - 1`` against the first
    ``cache_length`` keys of a static cache (``[B, H, S_max, D]``); causal buckets. ``q``:
    ``[B, H, 1, D]``; ``cache_length``: a python int or a 0-d int tensor on the device (so a CUDA
    graph can replay the step). Same result as ``attention(q, k_cache[:, :, :L], ..., causal=True,
    query_offset=L - 1, bidirectional=False)``. ``out``: ``[B, 1, H, D]``.

``gated_ffn_in(x, w_gate, w_up, activation) -> h``
    ``act(x @ w_gate.T) * (x @ w_up.T)``, or ``act(x @ w_gate.T)`` when ``w_up`` is None
    (non-gated FFN). ``activation`` is a transformers ACT2FN name (``gelu_new``, ``gelu``,
    ``relu``, ``silu``, ...). ``x``: ``[..., d_model]``, weights ``[d_ff, d_model]``.

``argmax(scores) -> ids``
    ``scores.argmax(-1)`` of ``[rows, vocab]`` scores (greedy decoding's pick): first maximum on ties,
    NaN counts as the maximum, as in torch.

``log_softmax(scores, out=None) -> log_probs``
    ``torch.log_softmax(scores, dim=-1, out=out)``, bit for bit (beam search's scores).

``log_softmax_top_k(logits, k, banned=()) -> (values, indices)``
    Beam search's step without its ``[rows, vocab]`` log-probabilities: the ``k`` best of
    ``log_softmax(logits)`` for each row of fp32 ``logits``, leaving out the ``banned`` ids (set to
    -inf after the log-softmax, as transformers' processors ban tokens: they still count in the
    normaliser), best first; ``k + len(banned) <= vocab``. Each value within rounding of
    ``log_softmax``'s (its normaliser may be summed in another order: an ulp or two of it).

``top_k(scores, k) -> (values, indices)``
    The ``k`` largest of each row of ``[rows, n]`` scores, largest first, as ``torch.topk(scores,
    k)``; among equal values the choice of index may differ from torch's (it does not specify one
    either).

``linear(x, weight, residual=None, out=None) -> y``
    ``x @ weight.T (+ residual)``; ``weight`` may be a ``QuantizedWeight`` (int8 + per-row scales)
    or a float tensor of another dtype than ``x`` (computed in ``x``'s dtype unless the backend says
    otherwise). ``out``: memory of the result's shape and dtype the backend may write it into and
    return (a buffer reused across decode steps), or ignore.
"""
import torch

MASKED_SCORE = -1.0e30


def available_backends():
    """Backends usable in this process, best first for CPU tensors."""
    names = ["eager"]
    try:
        from umt5_fast.ops import cpu  # noqa: F401  (needs the compiled extension)
        names.insert(0, "cpu")
    except ImportError:
        pass
    return names


def get_ops(backend: str, device: torch.device):
    """Return the ops module for ``backend`` ("auto", "triton", "cpu", "eager") on ``device``."""
    device = torch.device(device)
    if backend not in ("auto", "triton", "cpu", "eager"):
        raise ValueError(f"backend must be one of 'auto', 'triton', 'cpu', 'eager'; got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            backend = "triton" if _triton_importable() else "eager"
        else:
            backend = "cpu" if "cpu" in available_backends() else "eager"
    if backend == "eager":
        from umt5_fast.ops import eager
        return eager
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' runs on CPU tensors, but the model is on {device}")
        try:
            from umt5_fast.ops import cpu
        except ImportError as exc:
            raise RuntimeError("backend='cpu' needs the compiled extension umt5_fast._C, which failed "
                               f"to import ({exc}); reinstall with `pip install -e .` or use "
                               "backend='eager'") from exc
        return cpu
    if not _triton_importable():
        raise RuntimeError("backend='triton' needs the `triton` package (pip install triton)")
    from umt5_fast.ops import triton as triton_ops
    if device.type != "cuda" and not triton_ops.interpreted():
        # every op would quietly run in eager
        raise ValueError(f"backend='triton' runs its kernels on CUDA tensors, but the model is on {device} "
                         "(on a CPU use backend='cpu', or set TRITON_INTERPRET=1 to run the kernels in "
                         "Triton's interpreter)")
    return triton_ops


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
