"""Greedy argmax of the LM head without reading all of it (cpu backend).

At batch 1 the LM head (256384 x d_model) is ~85% of the bytes a decode step reads, and greedy
decoding needs only the argmax of its logits. ``LMHeadScreen`` keeps an int8 copy of the head
(per-row scales, a quarter of the fp32 bytes) and, per row n, a bound ``c[n]`` such that for every
input x

    |approx[n] - logit[n]| <= ||x||_2 * c[n]

where ``approx`` is the int8 kernel's product and ``logit`` the one the float kernel computes
(``ops.cpu.linear``, the logits greedy decoding would otherwise take the argmax of). ``c[n]`` is
Cauchy-Schwarz on the quantisation error, ``||w[n] - s[n] q[n]||_2``, plus the worst-case rounding
of both fp32 dot products (any summation order: gamma_K = K u / (1 - K u), u = 2^-24) and of the
screening arithmetic itself. Every row whose upper bound reaches the best lower bound is a
candidate; the float kernel then computes the candidates' logits exactly as it computes all of
them, so the winner (first index among equal maxima) is the unscreened argmax, bit for bit (bf16
logits are rounded after: see _BF16_LOGIT_SLACK). On a
random umt5-small a handful of the 256384 rows are candidates; a step reads the int8 head plus a
few float rows. When the bound cannot decide cheaply (non-finite input, too many candidates)
``argmax`` returns None and the caller computes every logit.
"""
from typing import Optional, Sequence

import torch

from umt5_fast.quant import QuantizedWeight

try:
    from umt5_fast.ops import cpu as cpu_ops
except ImportError:  # no extension: no cpu backend, no screen
    cpu_ops = None

_UNIT_ROUNDOFF = 2.0 ** -24
# bf16 activations (a bf16 model): the float kernel's fp32 sums are rounded to bf16, so a row whose
# sum lies a little below the best lower bound b can round to the largest logit and, as the first of
# equal logits, be the pick. b rounds to R within half a spacing s(b) <= 2^-7 |b|, and what rounds
# to R or above starts half a spacing below R, which is up to 2 s(b) where b < 0 sits just under a
# power of two: the threshold moves down by 1.5 s(b), rounded up to 2^-6 |b|.
_BF16_LOGIT_SLACK = 2.0 ** -6
# Inputs with a smaller norm (and so logits near fp32's subnormal range) go to the float path: the
# bound's underflow term is relative to this.
_MIN_NORM = 2.0 ** -60
# More candidates than this and computing them exactly would cost about as much as the whole head.
_MAX_CANDIDATES = 1024


class LMHeadScreen:
    def __init__(self, weight: torch.Tensor):
        """``weight``: the LM head's float weight ``[vocab, d_model]`` (fp32 or bf16), finite."""
        self.weight = weight.contiguous()
        self.screen = QuantizedWeight.quantize(self.weight)  # ValueError on inf / NaN
        vocab, in_features = self.weight.shape
        gamma = in_features * _UNIT_ROUNDOFF / (1 - in_features * _UNIT_ROUNDOFF)
        norms = torch.empty(vocab, 3, dtype=torch.float64)  # ||w - s q||, ||s q||, ||w|| per row
        cpu_ops._C.screen_row_norms(weight=self.weight.data_ptr(), bf16=self.weight.dtype == torch.bfloat16,
                                    qweight=self.screen.qweight.data_ptr(), scale=self.screen.scale.data_ptr(),
                                    rows=vocab, cols=in_features, out=norms.data_ptr(),
                                    num_threads=torch.get_num_threads())
        error_norm, screened_norm, exact_norm = norms.unbind(1)
        # quantisation error + the screen kernel's rounding (products, sum, scale multiply) + the
        # roundings of the threshold arithmetic in screen_candidates.cpp (each <= u (|approx| +
        # margin), |approx| <= ||x|| ||s q||; the margin part is in the 1e-5 below) + the float
        # kernel's rounding + underflow: each of the ~2K + 8 operations may lose up to 2^-126
        # (flush-to-zero) where the relative bounds fail, which ||x|| >= _MIN_NORM turns into a
        # relative term
        bound = (error_norm + (gamma + 6 * _UNIT_ROUNDOFF) * screened_norm + gamma * exact_norm
                 + (2 * in_features + 8) * 2.0 ** -126 / _MIN_NORM)
        self.bound = (bound * (1 + 1e-5)).float()  # rounded up past fp64 -> fp32 and the ||x|| rounding
        self.largest_norm = float(screened_norm.max())
        self.last_candidates = None  # candidates of the last decided call (for tests and benchmarks)

    def argmax(self, x: torch.Tensor, forbidden: Optional[Sequence[int]] = None) -> Optional[torch.Tensor]:
        """Per row of ``x`` ``[rows, d_model]`` (the LM head's input): the index of the largest logit
        ``ops.cpu.linear(x, weight)`` gives, ids in ``forbidden`` excluded (their logits -inf, as
        min_new_tokens sets them); None when the screen cannot decide."""
        x = x.contiguous()
        if not cpu_ops.float_kernel_computes(x.dtype, self.weight.dtype, x.shape[0]) or x.shape[0] == 0:
            return None  # (torch's GEMM would compute the logits: a subset of rows may sum differently)
        norm = x.double().norm(dim=1)
        if not bool(torch.isfinite(norm).all()) or float(norm.max()) * self.largest_norm > 1e30 \
                or float(norm.min()) < _MIN_NORM:
            return None  # inf / NaN input, logits near fp32 overflow or underflow: the float path decides
        if forbidden and len(set(forbidden)) >= self.weight.shape[0]:
            return None  # every id forbidden: the float path's argmax of all -inf
        approx = cpu_ops.linear(x.float(), self.screen)  # finite (inputs finite, far from overflow)
        if forbidden:
            approx[:, list(forbidden)] = -float("inf")
        norm = norm.float()  # (held by name: the kernel reads it)
        flags = torch.empty(approx.shape[1], dtype=torch.uint8)
        slack = _BF16_LOGIT_SLACK if x.dtype == torch.bfloat16 else 0.0  # fp32 logits: not rounded after
        cpu_ops._C.screen_candidates(approx=approx.data_ptr(), norm=norm.data_ptr(), bound=self.bound.data_ptr(),
                                     flags=flags.data_ptr(), rows=x.shape[0], cols=approx.shape[1], slack=slack,
                                     num_threads=torch.get_num_threads())
        candidates = flags.nonzero().squeeze(1)  # ascending ids
        if len(candidates) > _MAX_CANDIDATES:
            return None
        self.last_candidates = len(candidates)
        logits = cpu_ops.linear(x, self.weight.index_select(0, candidates)).float()
        return candidates[cpu_ops.argmax(logits)]


def _fingerprint(weight: torch.Tensor) -> tuple:
    """Identity and a sample of the contents of ``weight``: in-place edits through ``.data`` or numpy
    leave ``_version`` as it was, and a screen of the old values would pick from the wrong rows. The
    sample (every 509th row, two sums) catches whole-head edits such as scaling or reloading; an
    edit of single rows outside it is not seen: assign a new Parameter then."""
    sample = weight[::509].double()
    return (weight.data_ptr(), weight.shape, weight.dtype, weight._version, float(sample.sum()),
            float(sample.abs().sum()))


def screen_for(model) -> Optional[LMHeadScreen]:
    """The model's screen (built on first use, rebuilt when its LM head changed), or None when the
    model does not qualify: cpu backend, an fp32 or bf16 float LM head, ``model.screen_lm_head``.
    A model that stops qualifying drops its screen (which holds a reference to the head)."""
    lm_head = getattr(model, "lm_head", None)
    weight = lm_head.packed_weight() if lm_head is not None else None
    if cpu_ops is None or lm_head is None or model.runtime.ops is not cpu_ops \
            or not getattr(model, "screen_lm_head", True) or lm_head.bias is not None \
            or not isinstance(weight, torch.Tensor) or weight.dtype not in (torch.float32, torch.bfloat16) \
            or weight.device.type != "cpu":
        model.__dict__.pop("_lm_head_screen", None)
        return None
    built_for = _fingerprint(weight)
    built = getattr(model, "_lm_head_screen", None)
    if built is None or built[0] != built_for:
        try:
            screen = LMHeadScreen(weight)
        except ValueError:  # inf / NaN in the head: no int8 copy of it
            screen = None
        built = model._lm_head_screen = (built_for, screen)
    return built[1]
