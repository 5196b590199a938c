"""Greedy argmax, and top-k sampling's logits, of the LM head without reading all of it (cpu backend).

At batch 1 the LM head (256384 x d_model) is ~85% of the bytes a decode step reads, and greedy
decoding needs only the argmax of its logits. ``LMHeadScreen`` multiplies the input with an int8
copy of the head (per-row scales, a quarter of the fp32 bytes; an int8 head is its own copy) in
integers: the W8A8 kernel on the int8 rows as they are (a ``W8A8RowWeight`` view), which
quantises the input to int8 per row, so at 16 rows it also runs at the integer multiply rate rather
than the fp32 one. Per input row m and head row n,

    |approx[m, n] - logit[m, n]| <= ||x_m|| * c[n] + ||e_m|| * c2[n]

where ``logit`` is what the float kernel computes (``ops.cpu.linear``, the logits greedy decoding
would otherwise take the argmax of) and ``e_m`` is the quantisation error of x_m (measured per
call by ``w8a8_quantisation_error``, for the int8 values the kernel multiplies). ``c[n]`` is
Cauchy-Schwarz on the head's quantisation error ``||w[n] - s[n] q[n]||_2`` plus the worst-case
rounding of the float kernel's dot product (any summation order: gamma_K = K u / (1 - K u),
u = 2^-24), of the integer kernel's three fp32 roundings and of the screening arithmetic itself;
``c2[n]`` is ``||s[n] q[n]||`` (Cauchy-Schwarz on the input's error) with the same roundings. Every
row whose upper bound reaches the best lower bound is a candidate; the float kernel then computes
the candidates' logits exactly as it computes all of them, so the winner (first index among equal
maxima) is the unscreened argmax, bit for bit (bf16 / fp16 logits are rounded after: see
_LOGIT_ROUNDING). On a random umt5-small a handful of the 256384 rows are candidates; a step
reads the int8 head plus a few rows of the head. When the bound cannot decide cheaply (non-finite
input, too many candidates) ``argmax`` returns None and the caller computes every logit.
``top_candidates`` does the same for the k largest logits (top-k sampling needs no others): the
threshold is then the k-th largest of the chunks' best lower bounds (k columns reach it, so the
k-th largest logit does), and the candidates' exact logits are returned instead of a pick.
"""
import math
import threading
from typing import Optional, Sequence

import torch

from umt5_fast.quant import QuantizedWeight, W8A8RowWeight

try:
    from umt5_fast.ops import cpu as cpu_ops
except ImportError:  # no extension: no cpu backend, no screen
    cpu_ops = None

_UNIT_ROUNDOFF = 2.0 ** -24
# bf16 / fp16 activations (a bf16 / fp16 model): the float kernel's fp32 sums are rounded to bf16 /
# fp16, so a row whose sum lies a little below the best lower bound b can round to the largest logit
# and, as the first of equal logits, be the pick. b rounds to R within half a spacing s(b) <= 2^-p |b|
# (p = 7 fraction bits in bf16, 10 in fp16), and what rounds to R or above starts half a spacing
# below R, which is up to 2 s(b) where b < 0 sits just under a power of two: the threshold moves
# down by 1.5 s(b), rounded up to 2^(1-p) |b|. Below the smallest normal magnitude the spacing stays
# that of the smallest normal: the threshold moves by 2^(1-p) (|b| + floor), the floor at least that
# magnitude (bf16: 1e-30, far above it, so that slack * floor stays a normal fp32 number, also
# under flush-to-zero). An fp16 logit that rounds to inf (past 65504) leaves the pick to the float
# path (screen_candidates.cpp).
# dtype -> (slack, floor)
_LOGIT_ROUNDING = {torch.float32: (0.0, 0.0),  # fp32 logits: not rounded after
                   torch.bfloat16: (2.0 ** -6, 1e-30),
                   torch.float16: (2.0 ** -9, torch.finfo(torch.float16).tiny)}
# The head kinds of screen_argmax / screen_row_norms (an int8 head is kind 2); a dtype's kind is
# also screen_argmax's logits kind (the dtype its logits are rounded to).
_FLOAT_HEAD_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 3}
# Inputs with a smaller norm (and so logits near fp32's subnormal range) go to the float path: the
# bound's underflow term is relative to this.
_MIN_NORM = 2.0 ** -60
# More candidates than this and computing them exactly would cost about as much as the whole head
# (for an argmax; top_candidates' rows take candidates for k ids each, and the gathered rows of the head
# still cost a fraction of it: 16 rows x top_k 50, ~8600 candidates: 31 against 59 ms).
_MAX_CANDIDATES = 1024
_MAX_TOP_CANDIDATES = 16384
# top_candidates' candidates run ~10 per id asked for (a random umt5-small, top_k 50: 440-600 at one
# row); past this many ids (rows x k) the screen would rarely decide, and top-k sampling computes
# every logit from its first step.
TOP_CANDIDATES_MAX_IDS = 1024


class LMHeadScreen:
    def __init__(self, weight):
        """``weight``: the LM head ``[vocab, d_model]``, a finite fp32, bf16 or fp16 tensor or an int8
        ``QuantizedWeight`` (d_model <= 65536: the integer kernel's int32 sums)."""
        vocab, in_features = weight.shape
        if in_features > 65536:
            raise ValueError("the LM head screen's int32 sums hold up to 65536 products")
        int8_head = type(weight) is QuantizedWeight
        self.weight = weight if int8_head else weight.contiguous()
        # ValueError on inf / NaN
        rows_q = weight if int8_head else QuantizedWeight.quantize(self.weight)
        qweight, scale = rows_q.qweight.contiguous(), rows_q.scale.float().contiguous()
        norms = torch.empty(vocab, 3, dtype=torch.float64)  # ||w - s q||, ||s q||, ||w|| per row
        cpu_ops._C.screen_row_norms(weight=0 if int8_head else self.weight.data_ptr(),
                                    weight_kind=0 if int8_head else _FLOAT_HEAD_KINDS[self.weight.dtype],
                                    qweight=qweight.data_ptr(), scale=scale.data_ptr(), rows=vocab,
                                    cols=in_features, out=norms.data_ptr(), num_threads=torch.get_num_threads())
        self.screen = W8A8RowWeight(qweight, scale)  # multiplied in integers (an int8 head: no second copy)
        # The head the exact logits come from (kind, weight, scale: pointers into self.weight / self.screen)
        self._head = ((2, qweight.data_ptr(), scale.data_ptr()) if int8_head
                      else (_FLOAT_HEAD_KINDS[self.weight.dtype], self.weight.data_ptr(), 0))
        error_norm, screened_norm, exact_norm = norms.unbind(1)
        gamma = in_features * _UNIT_ROUNDOFF / (1 - in_features * _UNIT_ROUNDOFF)
        # The float kernel's dot product (an int8 head's kernel also rounds its scale multiply).
        exact_rounding = (gamma + 2 * _UNIT_ROUNDOFF if int8_head else gamma) * exact_norm
        # The integer kernel's sum is exact; it rounds float(sum), x_scale * s and their product:
        # <= 3.0001 u |S|, |S| = |<x - e, s q>| <= (||x|| + ||e||) ||s q||. The thresholding in
        # screen_candidates.cpp rounds a - margin and a + margin: each <= u (|approx| + margin), the
        # margin part in the 1e-5 below; 10 u covers both for each of ||x|| and ||e||.
        screen_rounding = 10 * _UNIT_ROUNDOFF * screened_norm
        # Underflow (flush-to-zero): each of the float kernel's ~2K + 8 operations may lose up to
        # 2^-126 where the relative bounds fail, and x_scale * s up to 2^-126 times |sum| <= 127^2 K;
        # ||x|| >= _MIN_NORM turns that into a relative term.
        underflow = (2 * in_features + 9 + 127 * 127 * in_features) * 2.0 ** -126 / _MIN_NORM
        bound = error_norm + exact_rounding + screen_rounding + underflow
        # rounded up past fp64 -> fp32, the roundings of the margin's two products and sum, and of
        # the norms of x and e (each to fp32)
        self.bound = (bound * (1 + 1e-5)).float()
        self.input_error_bound = ((screened_norm + screen_rounding) * (1 + 1e-5)).float()
        if not (bool(torch.isfinite(self.bound).all()) and bool(torch.isfinite(self.input_error_bound).all())):
            raise ValueError("the LM head's scales are not finite or too large for the screen's bound")
        self.largest_norm = float(screened_norm.max())
        self.last_candidates = None  # candidates of the last decided call (for tests and benchmarks)
        self._approx = torch.empty(0, vocab)  # the integer product's rows, reused across calls
        self._approx_lock = threading.Lock()

    # copy.deepcopy / pickle of a model that has generated (torch.save of a whole model): the lock
    # and the scratch rows are rebuilt, not copied
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_approx", "_approx_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._approx, self._approx_lock = torch.empty(0, self.weight.shape[0]), threading.Lock()

    def argmax(self, x: torch.Tensor, forbidden: Optional[Sequence[int]] = None) -> Optional[torch.Tensor]:
        """Per row of ``x`` ``[rows, d_model]`` (the LM head's input): the index of the largest logit
        ``ops.cpu.linear(x, weight)`` gives, ids in ``forbidden`` excluded (their logits -inf, as
        min_new_tokens sets them); None when the screen cannot decide."""
        picks = torch.empty(x.shape[0], dtype=torch.int64)
        return picks if self._screen(x, forbidden, 1, picks=picks) else None

    def top_candidates(self, x: torch.Tensor, k: int, forbidden: Optional[Sequence[int]] = None):
        """``(ids [n], logits [rows, n])``: ascending ids that hold, for every row of ``x``, each id
        that may be among its ``k`` largest logits (ties at the k-th included, ids in ``forbidden``
        left out), and the logits ``ops.cpu.linear(x, weight)`` gives there, bit for bit. With -inf
        at every other id they are scores whose k largest are the full logits': sampling with top-k
        needs no more. None when the screen cannot decide."""
        ids = torch.empty(_MAX_TOP_CANDIDATES, dtype=torch.int64)
        logits = torch.empty(x.shape[0], _MAX_TOP_CANDIDATES)
        count = self._screen(x, forbidden, k, ids=ids, logits=logits)
        return (ids[:count], logits[:, :count]) if count else None

    def _screen(self, x, forbidden, rank: int, picks=None, ids=None, logits=None) -> int:
        """screen_argmax's candidates for each row's ``rank`` largest logits into ``picks`` (the
        argmax) and / or ``ids`` / ``logits``; their number, or 0 when the screen cannot decide."""
        if x.dim() != 2 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"the LM head screen takes x [rows, {self.weight.shape[1]}], got {tuple(x.shape)}")
        if not x.is_contiguous():
            x = x.contiguous()
        int8_head = isinstance(self.weight, QuantizedWeight)
        if x.shape[0] == 0 or x.dtype not in _LOGIT_ROUNDING \
                or cpu_ops.wide_gemm_computes(x.dtype, self.weight, x.shape[0]) \
                or not (cpu_ops.int8_kernel_computes(x.dtype, x.shape[0]) if int8_head
                        else cpu_ops.float_kernel_computes(x.dtype, self.weight.dtype, x.shape[0])):
            return 0  # (torch's GEMM computes those logits: a subset of rows may sum differently)
        if len(set(forbidden or ())) + rank > self.weight.shape[0]:
            return 0  # fewer ids than asked for left: the float path's choice among -inf
        # One C++ call from here: the integer product, the threshold, the candidates' logits by the
        # unscreened path's C++ kernel (not ``linear``, which may send a few rows to a wide GEMM), on
        # the exactly widened x of a bf16 / fp16 model, rounded to its dtype after as ``linear`` rounds.
        x32 = x if x.dtype == torch.float32 else x.float()
        with self._approx_lock:  # one buffer: concurrent calls (threads sharing a model) take turns
            if self._approx.shape[0] < x.shape[0]:  # kept: a new 16-row buffer costs ~2 ms of page faults
                self._approx = torch.empty(x.shape[0], self.weight.shape[0])
            head_kind, head, head_scale = self._head
            slack, slack_floor = _LOGIT_ROUNDING[x.dtype]
            count = cpu_ops._C.screen_argmax(
                x=x32.data_ptr(), rows=x.shape[0], cols=x.shape[1], screen_qweight=self.screen.qweight.data_ptr(),
                screen_scale=self.screen.scale.data_ptr(), vocab=self.weight.shape[0], bound=self.bound.data_ptr(),
                bound2=self.input_error_bound.data_ptr(), largest_norm=self.largest_norm, min_norm=_MIN_NORM,
                head_kind=head_kind, head=head, head_scale=head_scale, logits_kind=_FLOAT_HEAD_KINDS[x.dtype],
                slack=slack,
                slack_floor=slack_floor,
                forbidden=sorted(set(forbidden)) if forbidden else [],
                max_candidates=_MAX_CANDIDATES if ids is None else _MAX_TOP_CANDIDATES,
                approx=self._approx.data_ptr(), out=0 if picks is None else picks.data_ptr(), rank=rank,
                candidate_ids=0 if ids is None else ids.data_ptr(),
                candidate_logits=0 if logits is None else logits.data_ptr(), num_threads=torch.get_num_threads())
        if count < 0:
            return 0  # inf / NaN input, logits near fp32 (fp16) overflow or underflow, too many candidates
        self.last_candidates = count
        return count


def _fingerprint(weight) -> tuple:
    """Identity and a sample of the contents of ``weight`` (a tensor, or an int8 head's qweight and
    scale): in-place edits through ``.data`` or numpy leave ``_version`` as it was, and a screen of
    the old values would pick from the wrong rows. The sample (every 509th row, two sums) catches
    whole-head edits such as scaling or reloading; an edit of single rows outside it is not seen:
    assign a new Parameter then."""
    if isinstance(weight, QuantizedWeight):
        return _fingerprint(weight.qweight) + _fingerprint(weight.scale)
    sample = weight[::509].double()
    return (weight.data_ptr(), weight.shape, weight.dtype, weight._version, float(sample.sum()),
            float(sample.abs().sum()))


def _screenable(weight) -> bool:
    """An fp32 / bf16 / fp16 CPU tensor, or our weight-only int8 (not W8A8, whose logits the integer kernel
    computes anyway, nor fp8 / GGUF blocks)."""
    if type(weight) is QuantizedWeight:
        kind_ok = weight.qweight.dtype == torch.int8
    else:
        kind_ok = isinstance(weight, torch.Tensor) and weight.dtype in _FLOAT_HEAD_KINDS
    return kind_ok and weight.device.type == "cpu" and weight.shape[0] > 0 and weight.shape[1] > 0


def screen_for(model) -> Optional[LMHeadScreen]:
    """The model's screen (built on first use, rebuilt when its LM head changed), or None when the
    model does not qualify: cpu backend, an fp32, bf16, fp16 or int8 LM head, ``model.screen_lm_head``.
    A model that stops qualifying drops its screen (which holds a reference to the head)."""
    lm_head = getattr(model, "lm_head", None)
    weight = lm_head.packed_weight() if lm_head is not None else None
    if cpu_ops is None or lm_head is None or model.runtime.ops is not cpu_ops \
            or not getattr(model, "screen_lm_head", True) or lm_head.bias is not None \
            or not _screenable(weight):
        model.__dict__.pop("_lm_head_screen", None)
        return None
    built_for = _fingerprint(weight)
    built = getattr(model, "_lm_head_screen", None)
    if built is None or built[0] != built_for:
        try:
            screen = LMHeadScreen(weight)
        except ValueError:  # inf / NaN in the head (no int8 copy of it), or d_model > 65536
            screen = None
        built = model._lm_head_screen = (built_for, screen)
    return built[1]
